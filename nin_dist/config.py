"""Typed run configuration: one frozen dataclass per concern, YAML files, dotted overrides.

A config is built from defaults, then a YAML file (`--config`), then `key=value` overrides whose
keys are dotted paths into the tree (`train.epochs=2`, `seed=1`). Values are converted with the
field's declared type (never `eval`), and every check runs before any work: an unknown key names
the closest valid one, a wrong type names the expected type, an impossible value names what is
allowed. All raise `ConfigError` (exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nin_dist.download import is_mirror_url
from nin_dist.errors import ConfigError, first_line
from nin_dist.shapes import parameter_count, smallest_input_size

# Upper bounds: above them a value overflows an int64 or a C int further down, or only exhausts the machine.
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000  # Fashion-MNIST's splits (nin_dist.data verifies the counts)
# The images are 28 pixels, the seed resizes to 224. At 2048 the seed's network costs ~150 GFLOP per image
# forward (100x) and ~0.3 GB of first-block activations per image; more pixels add only memory.
MAX_RESIZE = 2048
# 16x the seed's channels is ~500M parameters (2 GB of fp32 weights, ~6 GB with gradients and
# momentum); with a wide stem kernel the count is bounded on its own by MAX_PARAMETERS.
MAX_WIDTH = 16.0
MAX_PARAMETERS = 10**9
# A 64-bit seed: the data order and dropout mix it with the epoch / step and take the result modulo
# 2**64 (nin_dist.data, nin_dist.layers), the range torch's generators accept.
SEED_LIMIT = 2**63
MAX_EPOCHS = 10**6  # 6e10 images of Fashion-MNIST: beyond any run
MAX_STEPS = 10**12  # optimizer steps (and step intervals): keeps step counters far inside int64
MAX_THREADS = 1024  # torch intra-op threads: above any machine's cores; torch itself takes a C int
MAX_BUCKET_MB = 65536.0  # DDP bucket, MiB: larger than the gradients of the largest model allowed
MAX_TIMEOUT_S = 3600.0  # one tracking call; longer waits stall the run, and the sender's guard is 6x this

_show = reprlib.Repr()  # values in messages: short and on one line, however large or nested
_show.maxstring, _show.maxother, _show.maxlist, _show.maxdict, _show.maxlevel = 60, 60, 4, 4, 2


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={_show.repr(value)} is not allowed: {allowed}")


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # folder holding Fashion-MNIST; None = search (see nin_dist.data)
    download: bool = True  # fetch from data.mirror when no copy is found (false: stay offline)
    mirror: str | None = None  # base URL of the four .gz files; None = torchvision's mirror, then upstream's
    resize: int = 224  # side of the square image fed to the network, pixels
    normalize: bool = False  # subtract the train mean / divide by std (the seed does not)
    flip: bool = False  # random horizontal flip of training images
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    test_limit: int | None = None  # use only the first N test images (smoke runs)

    def __post_init__(self):
        _require(1 <= self.resize <= MAX_RESIZE, "data.resize", f"1 to {MAX_RESIZE} pixels", self.resize)
        _require(self.mirror is None or is_mirror_url(self.mirror), "data.mirror",
                 "null or an http(s) or file URL of the folder holding the four .gz files", self.mirror)
        for name, size in (("train_limit", TRAIN_IMAGES), ("test_limit", TEST_IMAGES)):
            value = getattr(self, name)
            _require(value is None or 1 <= value <= size, f"data.{name}",
                     f"null or a count from 1 to {size} (the split's size)", value)


@dataclass(frozen=True)
class ModelConfig:
    width: float = 1.0  # channel multiplier on the seed's 96/256/384 (1.0 = the seed)
    dropout: float = 0.5  # before the last block, as in the seed
    batchnorm: bool = False  # BatchNorm after each block's k x k conv (not in the seed)
    kernel: str = "auto"  # 1x1-conv pairs: triton | torch | auto (triton on CUDA)
    stem_kernel: int = 11  # first block's conv: kernel size, stride, padding (seed: 11/4/0)
    stem_stride: int = 4
    stem_padding: int = 0
    # The seed ends in ReLU -> global average pool, so class scores are never negative and a class
    # channel the ReLU silences early in training stays silent (its gradient is zero). false drops
    # that last ReLU; no parameter changes.
    logit_relu: bool = True

    @property
    def stem(self) -> tuple[int, int, int]:
        """(kernel size, stride, padding) of the first block's conv."""
        return self.stem_kernel, self.stem_stride, self.stem_padding

    def __post_init__(self):
        _require(0 < self.width <= MAX_WIDTH, "model.width", f"a positive multiplier up to {MAX_WIDTH:g}",
                 self.width)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "a probability in [0, 1)", self.dropout)
        _require(self.kernel in ("auto", "triton", "torch"), "model.kernel", "auto, triton or torch", self.kernel)
        _require(1 <= self.stem_kernel <= MAX_RESIZE, "model.stem_kernel", f"a kernel size from 1 to {MAX_RESIZE}",
                 self.stem_kernel)
        _require(1 <= self.stem_stride <= MAX_RESIZE, "model.stem_stride", f"a stride from 1 to {MAX_RESIZE}",
                 self.stem_stride)
        # Padding as wide as the kernel gives border outputs that see nothing but zeros.
        _require(0 <= self.stem_padding < self.stem_kernel, "model.stem_padding",
                 f"0 to model.stem_kernel - 1 = {self.stem_kernel - 1} pixels", self.stem_padding)
        count = parameter_count(self.width, self.stem_kernel, self.batchnorm)
        _require(count <= MAX_PARAMETERS, "model.width", f"a network of at most {MAX_PARAMETERS:.0e} parameters "
                 f"(this one, with model.stem_kernel={self.stem_kernel}, has {count:.2e})", self.width)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle | cosine (cosine includes linear warmup)
    warmup_epochs: float = 0.0  # cosine: linear warmup length; onecycle: rise length
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", "a positive learning rate", self.lr)
        _require(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _require(not self.nesterov or self.momentum > 0, "optim.nesterov",
                 "true only with optim.momentum > 0", self.nesterov)
        _require(self.weight_decay >= 0, "optim.weight_decay", "zero or more", self.weight_decay)
        _require(self.schedule in ("constant", "onecycle", "cosine"), "optim.schedule",
                 "constant, onecycle or cosine", self.schedule)
        _require(self.warmup_epochs >= 0, "optim.warmup_epochs", "zero or more epochs", self.warmup_epochs)
        _require(0 <= self.label_smoothing < 1, "optim.label_smoothing", "in [0, 1)", self.label_smoothing)
        _require(self.grad_clip >= 0, "optim.grad_clip", "zero (off) or a positive norm", self.grad_clip)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # global batch, images (each of N ranks takes batch_size / N)
    eval_batch_size: int = 500  # global evaluation batch, images
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 CUDA only) | fp64 (CPU reference) | auto
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads per process; None = cores / local ranks
    log_every: int = 50  # steps between train-loss logs (step 1, then every N)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size, MiB
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self):
        _require(1 <= self.epochs <= MAX_EPOCHS, "train.epochs", f"at least 1 (at most {MAX_EPOCHS})", self.epochs)
        # The upper bound of train.batch_size is the training split, checked with data.train_limit (Config).
        _require(self.batch_size >= 1, "train.batch_size", "a positive global batch", self.batch_size)
        _require(1 <= self.eval_batch_size <= TRAIN_IMAGES, "train.eval_batch_size",
                 f"a batch from 1 to {TRAIN_IMAGES} (the larger split)", self.eval_batch_size)
        _require(self.max_steps is None or 1 <= self.max_steps <= MAX_STEPS, "train.max_steps",
                 f"null or 1 to {MAX_STEPS:.0e}", self.max_steps)
        _require(self.precision in ("fp32", "bf16", "fp16", "fp64", "auto"), "train.precision",
                 "fp32, bf16, fp16, fp64 or auto", self.precision)
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", self.device)
        _require(self.threads is None or 1 <= self.threads <= MAX_THREADS, "train.threads",
                 f"null or 1 to {MAX_THREADS}", self.threads)
        _require(1 <= self.log_every <= MAX_STEPS, "train.log_every", f"at least 1 (at most {MAX_STEPS:.0e})",
                 self.log_every)
        _require(0 <= self.checkpoint_every <= MAX_STEPS, "train.checkpoint_every",
                 f"0 (epoch ends) or a step count up to {MAX_STEPS:.0e}", self.checkpoint_every)
        _require(0 < self.bucket_cap_mb <= MAX_BUCKET_MB, "train.bucket_cap_mb",
                 f"a positive size in MiB up to {MAX_BUCKET_MB:g}", self.bucket_cap_mb)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # false: run without MLflow (installed or not)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    experiment: str = "nin-fashion-mnist"
    system_metrics: bool = True  # MLflow's own CPU / memory / GPU sampling
    log_model: bool = True  # mlflow.pytorch.log_model at the end
    timeout_s: float = 10.0  # how long one tracking call may take before it is spooled

    def __post_init__(self):
        _require(bool(self.experiment.strip()), "tracking.experiment", "a non-empty name", self.experiment)
        _require(0 < self.timeout_s <= MAX_TIMEOUT_S, "tracking.timeout_s",
                 f"a positive number of seconds up to {MAX_TIMEOUT_S:g}", self.timeout_s)


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None  # None: generated, stable across torchrun restarts
    out_dir: str | None = None  # None: runs/<name>
    resume: bool = True  # continue from out_dir/checkpoints/last.pt when it exists
    allow_config_change: bool = False  # resume even if the checkpoint's config differs


@dataclass(frozen=True)
class Config:
    seed: int = 0  # seeds weights, data order, dropout
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _require(0 <= self.seed < SEED_LIMIT, "seed", f"an integer from 0 to 2**{SEED_LIMIT.bit_length() - 1} - 1",
                 self.seed)
        smallest = smallest_input_size(self.model.stem, MAX_RESIZE)
        if self.data.resize < smallest:
            raise ConfigError(
                f"data.resize={self.data.resize} is too small for the network: the smallest input "
                f"that reaches the last block with model.stem_kernel={self.model.stem_kernel}, "
                f"model.stem_stride={self.model.stem_stride}, model.stem_padding="
                f"{self.model.stem_padding} is {smallest}")
        images = self.data.train_limit or TRAIN_IMAGES
        if self.train.batch_size > images:
            where = f"data.train_limit={images}" if self.data.train_limit else "the training split"
            raise ConfigError(f"train.batch_size={self.train.batch_size} is larger than the {images} training "
                              f"images ({where}); it is the global batch")
        _require(self.optim.warmup_epochs <= self.train.epochs, "optim.warmup_epochs",
                 f"at most train.epochs={self.train.epochs} (the warmup is part of the run)", self.optim.warmup_epochs)


# --------------------------------------------------------------------------- building and parsing

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{inner.__name__} or null"
    return tp.__name__


def _convert(key: str, value: Any, tp) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ConfigError."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else tp
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~"):
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null: expected {_type_name(tp)}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
    elif base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:  # not a number: the wrong type (below)
            number = None
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if number is not None:
            _require(math.isfinite(number), key, "a finite number", value)
            return number
    elif base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            return _check_text(key, value)
    raise ConfigError(f"{key}={_show.repr(value)} has the wrong type: expected {_type_name(tp)}")


def _check_text(key: str, value: str) -> str:
    """A string field's value, if paths, URIs and names can hold it (no NUL, encodable for the OS)."""
    try:
        ok = "\0" not in value and value.encode("utf-8", "surrogateescape") is not None
    except UnicodeEncodeError:
        ok = False
    _require(ok, key, "text without NUL characters or unpaired surrogates", value)
    return value


def _name(text: str) -> str:
    """A key or path as typed when it prints on one line, else its (shortened) repr."""
    return text if text.isprintable() and len(text) <= 100 else _show.repr(text)


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {_name(key)}{hint}")


def all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree, e.g. 'train.epochs'."""
    cls = cls or Config
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _build(cls, values: dict, prefix: str = ""):
    types_ = _field_types(cls)
    for name in values:
        if not isinstance(name, str):
            where = f" in section {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"config key {_show.repr(name)}{where} is not a name ({type(name).__name__}): "
                              f"keys are names such as train or epochs")
        if name not in types_:
            raise _unknown_key(prefix + name, all_keys())
    kwargs = {}
    for name, tp in types_.items():
        if name not in values:
            continue
        if dataclasses.is_dataclass(tp):
            section = {} if values[name] is None else values[name]  # None: `train:`, every key commented out
            if not isinstance(section, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, not {type(section).__name__} "
                                  f"{_show.repr(section)}")
            kwargs[name] = _build(tp, section, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(prefix + name, values[name], tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, raw: str) -> None:
    valid = all_keys()
    if key not in valid:
        raise _unknown_key(key, valid)
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = raw


def _read_yaml(path: str | Path) -> dict:
    """The mapping a `--config` file holds, or ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    where = f"--config {_name(str(path))}"
    if path.is_dir():
        raise ConfigError(f"{where}: is a folder, not a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise ConfigError(f"{where}: cannot read it ({getattr(err, 'strerror', None) or first_line(err)})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({first_line(err)})") from None
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. a date 2020-13-01, a 5000-digit int
        raise ConfigError(f"{where}: YAML holds a value that cannot be read ({first_line(err)})") from None
    tree = {} if tree is None else tree  # an empty file, or comments only
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys at the top level, not "
                          f"{type(tree).__name__} {_show.repr(tree)}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; validated before returning."""
    tree = _read_yaml(path) if path is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {_show.repr(item)} is not key=value (e.g. train.epochs=2)")
        _set_dotted(tree, key.strip(), raw)
    try:
        return _build(Config, tree)
    except TypeError as err:  # a dataclass rejected its arguments: a bug, not user input
        raise RuntimeError(f"config construction failed: {err}") from err


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """{'train.epochs': 10, ...}: the resolved tree with dotted keys (MLflow params)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(to_dict(cfg), "")
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Keys that change how a run computes but not what it computes; a resume may change them freely.
_RESUMABLE_KEYS = ("train.max_steps", "train.progress", "train.log_every",
                   "train.checkpoint_every", "train.threads", "tracking.", "run.", "data.root",
                   "data.download", "data.mirror", "model.kernel", "train.compile", "train.bucket_cap_mb")


def model_relevant(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in flatten(cfg).items() if not k.startswith(_RESUMABLE_KEYS)}


def config_hash(cfg: Config) -> str:
    """Hash of the keys that decide the trained parameters (a resume must match it)."""
    blob = json.dumps(model_relevant(cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def replace(cfg: Config, **sections) -> Config:
    """dataclasses.replace for nested sections: replace(cfg, train={'epochs': 1})."""
    updates = {}
    for name, changes in sections.items():
        current = getattr(cfg, name)
        updates[name] = dataclasses.replace(current, **changes) if isinstance(changes, dict) else changes
    return dataclasses.replace(cfg, **updates)


__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "TrackingConfig",
           "RunConfig", "load_config", "flatten", "dump_yaml", "config_hash", "all_keys", "replace"]
