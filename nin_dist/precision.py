"""What `train.precision` and `train.channels_last` mean for tensors: dtype, memory format, autocast.

fp64 keeps parameters and activations in float64 (CPU reference runs); every other precision keeps
fp32 parameters, and bf16 / fp16 compute under autocast (fp16 with a gradient scaler, CUDA only).
The trainer, the evaluation and `nin-bench train` all take these from here.
"""

from __future__ import annotations

import contextlib

import torch

from nin_dist.config import TrainConfig
from nin_dist.errors import ConfigError

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(train: TrainConfig) -> torch.dtype:
    return torch.float64 if train.precision == "fp64" else torch.float32


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
