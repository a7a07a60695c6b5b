"""Throughput accounting: FLOPs per training image, peak FLOP/s of the device, MFU."""

from __future__ import annotations

import functools
import time

import torch

from nin_dist.config import Config
from nin_dist.shapes import flops_per_image

# Dense peak FLOP/s by card name fragment and compute dtype (vendor datasheets, SXM parts; TF32
# stands for fp32 because PyTorch's convs use it on these cards by default).
GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "V100": {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12},
}
_CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32, "fp64": torch.float64}


def train_flops_per_image(cfg: Config) -> float:
    """Forward + backward (about 3x forward: the input grad and the weight grad each cost one)."""
    model = cfg.model
    return 3.0 * flops_per_image(model.block_widths, model.kernels, model.stem, cfg.data.resize)


@functools.cache
def measured_cpu_flops(precision: str, threads: int) -> float:
    """FLOP/s of a 1024^3 matmul on this process's threads: the CPU's practical peak.

    CPUs differ too much (AVX2, AVX-512, AMX for bf16) for a table; one large GEMM tells what this
    one does, in about a quarter of a second.
    """
    dtype = _CPU_DTYPES[precision]
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a  # the first call sets up the GEMM backend (oneDNN for bf16)
    best = float("inf")
    # Best of 10: a moment of contention from another process must not lower the peak (MFU > 100%).
    for _ in range(10):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one rank's share of the device (on the CPU: a measured GEMM, see above)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name:
                return peaks[precision]
        return GPU_PEAKS["A100"][precision]
    return measured_cpu_flops(precision, torch.get_num_threads())


def mfu(img_per_s: float, cfg: Config, device: torch.device, world_size: int) -> float:
    """Model FLOPs utilisation of the whole job: achieved FLOP/s over the summed peak of all ranks."""
    achieved = img_per_s * train_flops_per_image(cfg)
    return achieved / (peak_flops(device, cfg.train.precision) * world_size)
