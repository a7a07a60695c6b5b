"""What `train.precision` and `train.channels_last` mean for tensors: dtype, memory format, autocast.

fp64 keeps parameters and activations in float64 (CPU reference runs); every other precision keeps
fp32 parameters, and bf16 / fp16 compute under autocast (fp16 with a gradient scaler, CUDA only).
`auto` is bf16 where the device computes it natively, else fp32: a CPU without bf16 instructions
(AVX2-only x86) emulates it, and a bf16 step there is ~7x slower than fp32 (BENCHMARKS.md).
The trainer, the evaluation and `nin-bench train` all take these from here.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from pathlib import Path

import torch

from nin_dist.config import Config, TrainConfig, replace
from nin_dist.errors import ConfigError

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of native bf16 arithmetic: x86's AVX512-BF16 and AMX, Arm's BF16 extension.
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags Linux lists for the first CPU (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 and Arm name the line differently
            return set(value.split())
    return set()


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(_CPU_BF16_FLAGS & cpu_flags())


def resolve(precision: str, device: torch.device) -> str:
    """`auto` made concrete for this device; any other precision as it is."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def resolve_config(cfg: Config, device: torch.device) -> Config:
    """The config with `train.precision=auto` replaced by what it means here, said once in the log."""
    if cfg.train.precision != "auto":
        return cfg
    precision = resolve("auto", device)
    if device.type == "cpu":
        found = ", ".join(sorted(_CPU_BF16_FLAGS & cpu_flags())) or "none"
        log.info("train.precision=auto -> %s (%s CPU, native bf16 flags: %s)", precision, platform.machine(), found)
    else:
        log.info("train.precision=auto -> %s (%s)", precision, torch.cuda.get_device_name(device))
    return replace(cfg, train={"precision": precision})


def param_dtype(train: TrainConfig) -> torch.dtype:
    return torch.float64 if train.precision == "fp64" else torch.float32


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype the convolutions compute in: autocast's, else the parameters'."""
    return _AUTOCAST_DTYPES.get(train.precision) or param_dtype(train)


def memory_format(train: TrainConfig) -> torch.memory_format:
    return torch.channels_last if train.channels_last else torch.contiguous_format


def prepare(inputs: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    """A batch from `nin_dist.data` in the parameters' dtype and the configured memory format."""
    return inputs.to(dtype=param_dtype(train), memory_format=memory_format(train))


def autocast(train: TrainConfig, device: torch.device):
    """The forward's autocast context (a no-op for fp32 and fp64)."""
    if train.precision not in _AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[train.precision])


def check_device(train: TrainConfig, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before any work."""
    if train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if train.precision == "fp64" and device.type != "cpu":
        raise ConfigError("train.precision=fp64 is for CPU reference runs; use train.device=cpu or fp32/bf16")
