"""Datasheet peaks of the cards a GPU visit may get, looked up by the name torch gives the device.

Dense (not "with sparsity") tensor-core figures, from NVIDIA's datasheets: the H100 Tensor Core GPU
datasheet (nvidia.com/en-us/data-center/h100, SXM5 / PCIe / NVL columns) and the H200 Tensor Core
GPU datasheet (nvidia.com/en-us/data-center/h200, SXM / NVL columns); the datasheets list the
sparse figure, twice the dense one. A card not in the table gets no peak: its rows say "unknown
card" and carry no roofline percentages, rather than an H100's peaks under another card's times.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Peaks:
    card: str  # the datasheet column
    bf16_tflops: float  # dense BF16/FP16 tensor core
    tf32_tflops: float  # dense TF32 tensor core
    fp32_tflops: float  # FP32 without tensor cores
    hbm_tbps: float  # memory bandwidth
    source: str
    traffic_device: str | None = None  # the `nin-bench traffic` device whose predictions apply


_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
# Most specific first: torch names an H100 SXM5 "NVIDIA H100 80GB HBM3", a PCIe card "NVIDIA H100 PCIe".
_TABLE = (
    (("H200 NVL",), Peaks("H200 NVL", 835.5, 417.5, 60.0, 4.8, _H200)),
    (("H200",), Peaks("H200 SXM", 989.5, 494.5, 67.0, 4.8, _H200, "H200")),
    (("H100 NVL",), Peaks("H100 NVL", 835.5, 417.5, 60.0, 3.9, _H100)),
    (("H100 PCIe",), Peaks("H100 PCIe", 756.5, 378.0, 51.0, 2.0, _H100)),
    (("H100 SXM", "H100 80GB HBM3"), Peaks("H100 SXM5", 989.5, 494.5, 67.0, 3.35, _H100, "H100")),
)


def lookup(device_name: str) -> Peaks | None:
    """The peaks of the card torch calls `device_name`, or None for a card not in the table."""
    for keys, peaks in _TABLE:
        if any(k.lower() in device_name.lower() for k in keys):
            return peaks
    return None


def describe(device_name: str) -> dict:
    """The peaks as row fields: the datasheet's figures, or the reason there are none."""
    peaks = lookup(device_name)
    if peaks is None:
        return {"device": device_name, "peaks": None,
                "peaks_note": f"unknown card {device_name!r}: no datasheet peaks, so no roofline percentages"}
    return {"device": device_name, "peaks": dataclasses.asdict(peaks)}
