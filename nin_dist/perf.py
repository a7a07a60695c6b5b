"""Throughput accounting: FLOPs per training image, peak FLOP/s of the device, MFU."""

from __future__ import annotations

import os

import torch

from nin_dist.config import Config
from nin_dist.model import flops_per_image

# Dense peak FLOP/s by card name fragment and compute dtype (vendor datasheets, SXM parts; TF32
# stands for fp32 because PyTorch's convs use it on these cards by default).
GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "V100": {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12},
}
# A CPU core with two AVX2 FMA units does 2 x 8 x 2 = 32 fp32 FLOP per cycle; 2.5 GHz assumed.
CPU_FLOP_PER_CORE = 32 * 2.5e9


def train_flops_per_image(cfg: Config) -> float:
    """Forward + backward (about 3x forward: the input grad and the weight grad each cost one)."""
    return 3.0 * flops_per_image(cfg.model, cfg.data.resize)


def peak_flops(device: torch.device, precision: str, processes_per_node: int = 1) -> float:
    """Peak FLOP/s of one rank's share of the device (an estimate on the CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name:
                return peaks[precision]
        return GPU_PEAKS["A100"][precision]
    cores = max(1, (os.cpu_count() or 1) // processes_per_node)
    return cores * CPU_FLOP_PER_CORE


def mfu(img_per_s: float, cfg: Config, device: torch.device, world_size: int, processes_per_node: int) -> float:
    """Model FLOPs utilisation of the whole job: achieved FLOP/s over the summed peak of all ranks."""
    achieved = img_per_s * train_flops_per_image(cfg)
    return achieved / (peak_flops(device, cfg.train.precision, processes_per_node) * world_size)
