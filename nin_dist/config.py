"""Typed run configuration: one frozen dataclass per concern, YAML files, dotted overrides.

A config is built from defaults, then a YAML file (`--config`), then `key=value` overrides whose
keys are dotted paths into the tree (`train.epochs=2`, `seed=1`). Values are converted with the
field's declared type (never `eval`), and every check runs before any work: an unknown key names
the closest valid one, a wrong type names the expected type, an impossible value names what is
allowed. All raise `ConfigError` (exit code 2). The reading and converting is `nin_dist.typed_yaml`;
what each key means and allows is here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nin_dist.download import is_mirror_url
from nin_dist.errors import ConfigError
from nin_dist.shapes import LATER_KERNELS, SEED_WIDTHS, block_widths, parameter_count, smallest_input_size
from nin_dist.typed_yaml import leaf_keys, load_tree, require

# Upper bounds: above them a value overflows an int64 or a C int further down, or only exhausts the machine.
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000  # Fashion-MNIST's splits (nin_dist.data verifies the counts)
# The images are 28 pixels, the seed resizes to 224. At 2048 the seed's network costs ~150 GFLOP per image
# forward (100x) and ~0.3 GB of first-block activations per image; more pixels add only memory.
MAX_RESIZE = 2048
# 16x the seed's channels is ~500M parameters (2 GB of fp32 weights, ~6 GB with gradients and
# momentum); with a wide stem kernel the count is bounded on its own by MAX_PARAMETERS.
MAX_WIDTH = 16.0
MAX_CHANNELS = round(MAX_WIDTH * max(SEED_WIDTHS))  # a block of model.widths: the widest model.width builds
MAX_PARAMETERS = 10**9
# Blocks 2-4's k x k convs (model.kernels): odd, so padding k // 2 keeps the size. 31 is wider than
# the seed's block-2 input at 224 pixels (26): a larger kernel there only adds weights that see the
# zero padding. MAX_PARAMETERS bounds the count on its own.
MAX_LATER_KERNEL = 31
# A 64-bit seed: the data order and dropout mix it with the epoch / step and take the result modulo
# 2**64 (nin_dist.data, nin_dist.layers), the range torch's generators accept.
SEED_LIMIT = 2**63
MAX_EPOCHS = 10**6  # 6e10 images of Fashion-MNIST: beyond any run
MAX_STEPS = 10**12  # optimizer steps (and step intervals): keeps step counters far inside int64
MAX_THREADS = 1024  # torch intra-op threads: above any machine's cores; torch itself takes a C int
MAX_BUCKET_MB = 65536.0  # DDP bucket, MiB: larger than the gradients of the largest model allowed
# A shift of half the 28-pixel image each way already moves most of a garment out of the frame.
MAX_TRANSLATE = 14
MAX_TIMEOUT_S = 3600.0  # one tracking call; longer waits stall the run, and the sender's guard is 6x this
MAX_DIST_TIMEOUT_S = 86400.0  # one collective: a day; a peer silent for longer is gone
# A profiled step of configs/cpu.yaml is ~1 MB of trace per rank, of the seed's network at 224 tens of
# MB (every op of every layer, forward and backward); a window is a few steps, not an epoch.
MAX_PROFILE_STEPS = 100
# train.dist_timeout_s when null, by what a rank does between two collectives (default_dist_timeout_s).
# An eager step on a CPU, a checkpoint or an evaluation shard takes seconds: two minutes of silence
# mean a lost peer. On a GPU the first eager step also JIT-compiles the fused Triton kernels and sets
# up nccl's communicators, cold caches included: ten minutes. With train.compile=true the first step
# waits in its first collective until the slowest rank has compiled the forward and backward graphs
# with a cold cache: 230 s for the 2 steps of test_compile_on_cpu (a small model, one process, 2 busy
# CPU cores), and every process of a machine compiles at once on the same cores; on a GPU, minutes of
# compiling and autotuning. Half an hour leaves room for that and still ends a lost-peer hang; where
# hosts get lost, set the key to what a warm cache needs.
DIST_TIMEOUT_S = {"cpu": 120.0, "cuda": 600.0}
COMPILED_DIST_TIMEOUT_S = 1800.0


def default_dist_timeout_s(compile: bool, device_type: str) -> float:
    """train.dist_timeout_s when null: seconds, for a step compiled (train.compile) or not on this device type."""
    return COMPILED_DIST_TIMEOUT_S if compile else DIST_TIMEOUT_S[device_type]


RUN_ID = re.compile(r"[A-Za-z0-9][\w-]{0,255}")  # what MLflow accepts as a run id
# A registered model's name, as a `models:/NAME@alias` URI can carry it (MLflow splits those at / and @).
MODEL_NAME = re.compile(r"(?!\.\.|\.$)[^\s/:@%\x00-\x1f\x7f](?:[^/:@%\x00-\x1f\x7f]{0,254}[^\s/:@%\x00-\x1f\x7f])?")
PROGRESS_MODES = ("auto", "bar", "lines", "off")  # train.progress (nin_dist.progress)
SWEEP_SECTION = "sweep"  # nin-sweep's search space in a config file (nin_dist.sweep.space); nin-train skips it

@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # folder holding Fashion-MNIST; None = search (see nin_dist.data)
    download: bool = True  # fetch from data.mirror when no copy is found (false: stay offline)
    mirror: str | None = None  # base URL of the four .gz files; None = torchvision's mirror, then upstream's
    resize: int = 224  # side of the square image fed to the network, pixels
    normalize: bool = False  # subtract the train mean / divide by std (the seed does not)
    flip: bool = False  # random horizontal flip of training images (with or without data.augment)
    # Held out of the training split (stratified by class, chosen by the seed) and scored every epoch;
    # 0 = none, and the test split is scored every epoch instead.
    val_size: int = 0  # images
    augment: bool = False  # random translate and erasing of training images, as the two keys below say
    translate: int = 2  # with data.augment: shift by up to this many pixels each way, zero padding; 0 = off
    erase: float = 0.0  # with data.augment: probability of erasing a random rectangle of an image; 0 = off
    train_limit: int | None = None  # use only the first N training images (smoke runs)
    test_limit: int | None = None  # use only the first N test images (smoke runs)

    def __post_init__(self):
        require(1 <= self.resize <= MAX_RESIZE, "data.resize", f"1 to {MAX_RESIZE} pixels", self.resize)
        require(self.mirror is None or is_mirror_url(self.mirror), "data.mirror",
                 "null or an http(s) or file URL of the folder holding the four .gz files", self.mirror)
        for name, size in (("train_limit", TRAIN_IMAGES), ("test_limit", TEST_IMAGES)):
            value = getattr(self, name)
            require(value is None or 1 <= value <= size, f"data.{name}",
                     f"null or a count from 1 to {size} (the split's size)", value)
        require(0 <= self.translate <= MAX_TRANSLATE, "data.translate", f"0 to {MAX_TRANSLATE} pixels (of the "
                f"28-pixel image)", self.translate)
        require(0.0 <= self.erase <= 1.0, "data.erase", "a probability in [0, 1]", self.erase)


@dataclass(frozen=True)
class ModelConfig:
    width: float = 1.0  # channel multiplier on the seed's 96/256/384 (1.0 = the seed)
    # Channels of blocks 1-3, chosen one by one (e.g. [32, 96, 192]); null = model.width's rule.
    widths: tuple[int, ...] | None = None
    kernels: tuple[int, ...] = LATER_KERNELS  # blocks 2-4's k x k convs, odd, padding k // 2 (seed: 5, 3, 3)
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

    @property
    def block_widths(self) -> tuple[int, ...]:
        """Channels of blocks 1-3: model.widths, or model.width times the seed's."""
        return block_widths(self.width, self.widths)

    def __post_init__(self):
        require(0 < self.width <= MAX_WIDTH, "model.width", f"a positive multiplier up to {MAX_WIDTH:g}",
                 self.width)
        if self.widths is not None:
            require(len(self.widths) == 3, "model.widths", "null or three channel counts, of blocks 1-3 "
                    "(e.g. 32,96,192)", list(self.widths))
            require(all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in self.widths), "model.widths",
                    f"channel counts from 1 to {MAX_CHANNELS}", list(self.widths))
            if self.width != 1.0:
                raise ConfigError(f"model.widths={list(self.widths)} and model.width={self.width:g} both set the "
                                  f"channels: set one of them (model.width=1 with model.widths)")
        require(len(self.kernels) == 3, "model.kernels", "three kernel sizes, of blocks 2-4 (the seed's: 5,3,3)",
                list(self.kernels))
        require(all(_is_int(k) and 1 <= k <= MAX_LATER_KERNEL and k % 2 == 1 for k in self.kernels),
                "model.kernels", f"odd kernel sizes from 1 to {MAX_LATER_KERNEL} (padding k // 2 keeps the size)",
                list(self.kernels))
        require(0.0 <= self.dropout < 1.0, "model.dropout", "a probability in [0, 1)", self.dropout)
        require(self.kernel in ("auto", "triton", "torch"), "model.kernel", "auto, triton or torch", self.kernel)
        require(1 <= self.stem_kernel <= MAX_RESIZE, "model.stem_kernel", f"a kernel size from 1 to {MAX_RESIZE}",
                 self.stem_kernel)
        require(1 <= self.stem_stride <= MAX_RESIZE, "model.stem_stride", f"a stride from 1 to {MAX_RESIZE}",
                 self.stem_stride)
        # Padding as wide as the kernel gives border outputs that see nothing but zeros.
        require(0 <= self.stem_padding < self.stem_kernel, "model.stem_padding",
                 f"0 to model.stem_kernel - 1 = {self.stem_kernel - 1} pixels", self.stem_padding)
        count = parameter_count(self.block_widths, self.kernels, self.stem_kernel, self.batchnorm)
        key, value = ("model.width", self.width) if self.widths is None else ("model.widths", list(self.widths))
        require(count <= MAX_PARAMETERS, key, f"a network of at most {MAX_PARAMETERS:.0e} parameters "
                f"(this one, with model.stem_kernel={self.stem_kernel} and model.kernels={list(self.kernels)}, "
                f"has {count:.2e})", value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        require(self.lr > 0, "optim.lr", "a positive learning rate", self.lr)
        require(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        require(not self.nesterov or self.momentum > 0, "optim.nesterov",
                 "true only with optim.momentum > 0", self.nesterov)
        require(self.weight_decay >= 0, "optim.weight_decay", "zero or more", self.weight_decay)
        require(self.schedule in ("constant", "onecycle", "cosine"), "optim.schedule",
                 "constant, onecycle or cosine", self.schedule)
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", "zero or more epochs", self.warmup_epochs)
        require(0 <= self.label_smoothing < 1, "optim.label_smoothing", "in [0, 1)", self.label_smoothing)
        require(self.grad_clip >= 0, "optim.grad_clip", "zero (off) or a positive norm", self.grad_clip)


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
    # torch intra-op threads per process; None = cores / local ranks, or OMP_NUM_THREADS when set for a
    # process alone on its machine (nin_dist.distributed.default_threads)
    threads: int | None = None
    log_every: int = 50  # steps between train-loss logs (step 1, then every N)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size, MiB
    # Seconds a collective (and the process group's set-up) waits for the other ranks before this
    # rank fails and torchrun restarts the job: how long a lost or cut-off host takes to be found.
    # null: by what a step does (DIST_TIMEOUT_S above): 120 on a CPU, 600 on a GPU, 1800 with
    # train.compile=true on either (the first step waits for the slowest rank's cold compile).
    dist_timeout_s: float | None = None
    # Rank 0's progress display: bar (tqdm, for a terminal), lines (one log line every train.log_every
    # steps, no carriage returns: for log files), off, or auto = bar when stderr is a terminal, else
    # lines. true means auto and false off (YAML reads `off` as false).
    progress: bool | str = "auto"
    ema_decay: float = 0.0  # exponential moving average of the weights, evaluated and logged; 0 = off
    tta: bool = False  # evaluation averages the class probabilities of each image and its mirror
    eval_test_every_epoch: bool = False  # with data.val_size: score test every epoch too, not only at the end
    # The profile window (nin_dist.profiling): global steps profile_start .. profile_start + profile_steps - 1
    # traced on every rank into run.out_dir/profile/ and MLflow. The default start skips step 1, whose
    # allocations and DDP's bucket rebuild are not what later steps cost.
    profile_start: int = 2  # first global step profiled (step 1 is the run's first)
    profile_steps: int = 0  # steps profiled; 0 = off (no profiler made)
    profile_memory: bool = False  # with a window, CUDA only: the caching allocator's history (memory_viz)

    def __post_init__(self):
        require(1 <= self.epochs <= MAX_EPOCHS, "train.epochs", f"at least 1 (at most {MAX_EPOCHS})", self.epochs)
        # The upper bound of train.batch_size is the training split, checked with data.train_limit (Config).
        require(self.batch_size >= 1, "train.batch_size", "a positive global batch", self.batch_size)
        require(1 <= self.eval_batch_size <= TRAIN_IMAGES, "train.eval_batch_size",
                 f"a batch from 1 to {TRAIN_IMAGES} (the larger split)", self.eval_batch_size)
        require(self.max_steps is None or 1 <= self.max_steps <= MAX_STEPS, "train.max_steps",
                 f"null or 1 to {MAX_STEPS:.0e}", self.max_steps)
        require(self.precision in ("fp32", "bf16", "fp16", "fp64", "auto"), "train.precision",
                 "fp32, bf16, fp16, fp64 or auto", self.precision)
        require(self.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", self.device)
        require(self.threads is None or 1 <= self.threads <= MAX_THREADS, "train.threads",
                 f"null or 1 to {MAX_THREADS}", self.threads)
        require(1 <= self.log_every <= MAX_STEPS, "train.log_every", f"at least 1 (at most {MAX_STEPS:.0e})",
                 self.log_every)
        require(0 <= self.checkpoint_every <= MAX_STEPS, "train.checkpoint_every",
                 f"0 (epoch ends) or a step count up to {MAX_STEPS:.0e}", self.checkpoint_every)
        require(0 < self.bucket_cap_mb <= MAX_BUCKET_MB, "train.bucket_cap_mb",
                 f"a positive size in MiB up to {MAX_BUCKET_MB:g}", self.bucket_cap_mb)
        require(self.dist_timeout_s is None or 1 <= self.dist_timeout_s <= MAX_DIST_TIMEOUT_S, "train.dist_timeout_s",
                f"null (120 s on a CPU, 600 s on a GPU, {COMPILED_DIST_TIMEOUT_S:g} s with train.compile) or 1 to "
                f"{MAX_DIST_TIMEOUT_S:g} seconds", self.dist_timeout_s)
        require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "in [0, 1) (0 = off)", self.ema_decay)
        require(1 <= self.profile_start <= MAX_STEPS, "train.profile_start",
                f"a global step from 1 to {MAX_STEPS:.0e} (step 1 is the first)", self.profile_start)
        require(0 <= self.profile_steps <= MAX_PROFILE_STEPS, "train.profile_steps",
                f"0 (off) or a step count up to {MAX_PROFILE_STEPS}", self.profile_steps)
        require(not self.profile_memory or self.device != "cpu", "train.profile_memory",
                "false with train.device=cpu (it records the CUDA caching allocator)", self.profile_memory)
        if isinstance(self.progress, bool):  # the switch's old form: stored as the mode it means
            object.__setattr__(self, "progress", "auto" if self.progress else "off")
        require(self.progress in PROGRESS_MODES, "train.progress", "auto, bar, lines or off (true = auto, "
                "false = off)", self.progress)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # false: run without MLflow (installed or not)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    experiment: str = "nin-fashion-mnist"
    system_metrics: bool = True  # MLflow's own CPU / memory / GPU sampling
    log_model: bool = True  # mlflow.pytorch.log_model at the end
    timeout_s: float = 10.0  # how long one tracking call may take before it is spooled
    # The run nests under this MLflow run (tag mlflow.parentRunId); nin-sweep sets it for its trials.
    parent_run_id: str | None = None
    # The logged model also becomes a new version of this registered model (created if missing).
    register_model: str | None = None

    def __post_init__(self):
        require(bool(self.experiment.strip()), "tracking.experiment", "a non-empty name", self.experiment)
        require(self.parent_run_id is None or RUN_ID.fullmatch(self.parent_run_id) is not None,
                "tracking.parent_run_id", "null or an MLflow run id (letters, digits, '_' and '-')",
                self.parent_run_id)
        require(self.register_model is None or MODEL_NAME.fullmatch(self.register_model) is not None,
                "tracking.register_model", "null or a model name of 1 to 256 characters without '/', ':', '@', "
                "'%', control characters or space at its ends, not '.' or starting '..' (models:/NAME@alias names it)",
                self.register_model)
        require(self.register_model is None or self.log_model, "tracking.register_model",
                "null when tracking.log_model=false (the version is made from the logged model)",
                self.register_model)
        require(0 < self.timeout_s <= MAX_TIMEOUT_S, "tracking.timeout_s",
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
        require(0 <= self.seed < SEED_LIMIT, "seed", f"an integer from 0 to 2**{SEED_LIMIT.bit_length() - 1} - 1",
                 self.seed)
        smallest = smallest_input_size(self.model.stem, MAX_RESIZE)
        if self.data.resize < smallest:
            raise ConfigError(
                f"data.resize={self.data.resize} is too small for the network: the smallest input "
                f"that reaches the last block with model.stem_kernel={self.model.stem_kernel}, "
                f"model.stem_stride={self.model.stem_stride}, model.stem_padding="
                f"{self.model.stem_padding} is {smallest}")
        images = self.data.train_limit or TRAIN_IMAGES
        where = f"data.train_limit={images}" if self.data.train_limit else "the training split"
        require(0 <= self.data.val_size < images, "data.val_size",
                f"0 to {images - 1} images (fewer than the {images} of {where})", self.data.val_size)
        trained = images - self.data.val_size
        if self.train.batch_size > trained:
            held = f" less data.val_size={self.data.val_size}" if self.data.val_size else ""
            raise ConfigError(f"train.batch_size={self.train.batch_size} is larger than the {trained} training "
                              f"images ({where}{held}); it is the global batch")
        require(self.optim.warmup_epochs <= self.train.epochs, "optim.warmup_epochs",
                 f"at most train.epochs={self.train.epochs} (the warmup is part of the run)", self.optim.warmup_epochs)


def all_keys() -> list[str]:
    """Every dotted leaf key of the config tree, e.g. 'train.epochs'."""
    return leaf_keys(Config)


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                defaults_for: tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; validated before returning. A `sweep:` section
    is nin-sweep's search space, not a key of the run: skipped here. The file's sections named in
    `defaults_for` (e.g. a run's stored `tracking` and `run`, for nin-eval) are ignored too."""
    return load_tree(Config, path, overrides, skip=(SWEEP_SECTION, *defaults_for))


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


# Keys that change how a run computes but not what it computes; a resume may change them freely. One
# ending in "." or "_" stands for every key it begins; any other for itself alone (model.kernel, the
# kernel switch, is not model.kernels, the network's convs).
_RESUMABLE_KEYS = ("train.max_steps", "train.progress", "train.log_every", "train.dist_timeout_s",
                   "train.checkpoint_every", "train.threads", "train.tta",
                   "train.eval_test_every_epoch", "train.profile_", "tracking.", "run.", "data.root",
                   "data.download", "data.mirror", "model.kernel", "train.compile", "train.bucket_cap_mb")


# Keys that came after runs had saved checkpoints, with the value that builds what those runs built: at
# that value a key is left out, so the hash of those runs' configs stays theirs (their checkpoints
# resume, a sweep's fixed config is still its study's).
_LATER_KEYS_AS_BEFORE = {"model.widths": None, "model.kernels": LATER_KERNELS}


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith((".", "_")) and key.startswith(k)) for k in _RESUMABLE_KEYS)


def model_relevant(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in flatten(cfg).items() if not _resumable(k)
            and not (k in _LATER_KEYS_AS_BEFORE and v == _LATER_KEYS_AS_BEFORE[k])}


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
