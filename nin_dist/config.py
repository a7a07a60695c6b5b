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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nin_dist.errors import ConfigError
from nin_dist.shapes import smallest_input_size


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # folder holding Fashion-MNIST; None = search (see nin_dist.data)
    download: bool = False  # fetch with torchvision when no copy is found
    resize: int = 224  # side of the square image fed to the network, pixels
    normalize: bool = False  # subtract the train mean / divide by std (the seed does not)
    flip: bool = False  # random horizontal flip of training images
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    test_limit: int | None = None  # use only the first N test images (smoke runs)

    def __post_init__(self):
        _require(self.resize >= 1, "data.resize", "a positive number of pixels", self.resize)
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"data.{name}", "null or a positive count", value)


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
        _require(self.width > 0, "model.width", "a positive multiplier", self.width)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "a probability in [0, 1)", self.dropout)
        _require(self.kernel in ("auto", "triton", "torch"), "model.kernel", "auto, triton or torch", self.kernel)
        _require(self.stem_kernel >= 1, "model.stem_kernel", "a positive kernel size", self.stem_kernel)
        _require(self.stem_stride >= 1, "model.stem_stride", "a positive stride", self.stem_stride)
        _require(self.stem_padding >= 0, "model.stem_padding", "zero or more pixels", self.stem_padding)


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
        _require(self.momentum >= 0, "optim.momentum", "zero or more", self.momentum)
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
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 CUDA only) | fp64 (CPU reference runs)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads per process; None = cores / local ranks
    log_every: int = 50  # steps between train-loss logs (step 1, then every N)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size, MiB
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self):
        _require(self.epochs >= 1, "train.epochs", "at least 1", self.epochs)
        _require(self.batch_size >= 1, "train.batch_size", "a positive global batch", self.batch_size)
        _require(self.eval_batch_size >= 1, "train.eval_batch_size", "a positive batch", self.eval_batch_size)
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "null or at least 1",
                 self.max_steps)
        _require(self.precision in ("fp32", "bf16", "fp16", "fp64"), "train.precision",
                 "fp32, bf16, fp16 or fp64", self.precision)
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", self.device)
        _require(self.threads is None or self.threads >= 1, "train.threads", "null or at least 1", self.threads)
        _require(self.log_every >= 1, "train.log_every", "at least 1", self.log_every)
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", "0 (epoch ends) or a step count",
                 self.checkpoint_every)
        _require(self.bucket_cap_mb > 0, "train.bucket_cap_mb", "a positive size in MiB", self.bucket_cap_mb)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # false: run without MLflow (installed or not)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    experiment: str = "nin-fashion-mnist"
    system_metrics: bool = True  # MLflow's own CPU / memory / GPU sampling
    log_model: bool = True  # mlflow.pytorch.log_model at the end
    timeout_s: float = 10.0  # how long one tracking call may take before it is spooled


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
        smallest = smallest_input_size(self.model.stem)
        if self.data.resize < smallest:
            raise ConfigError(
                f"data.resize={self.data.resize} is too small for the network: the smallest input "
                f"that reaches the last block with model.stem_kernel={self.model.stem_kernel}, "
                f"model.stem_stride={self.model.stem_stride}, model.stem_padding="
                f"{self.model.stem_padding} is {smallest}")


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
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {key}{hint}")


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


def _build(cls, values: dict[str, Any], prefix: str = ""):
    types_ = _field_types(cls)
    for name in values:
        if name not in types_:
            raise _unknown_key(prefix + name, all_keys())
    kwargs = {}
    for name, tp in types_.items():
        if name not in values:
            continue
        if dataclasses.is_dataclass(tp):
            section = values[name]
            if not isinstance(section, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, got {section!r}")
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
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; validated before returning."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: expected a mapping of config keys at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=2)")
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
                   "data.download", "model.kernel", "train.compile", "train.bucket_cap_mb")


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
