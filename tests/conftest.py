"""Shared fixtures: the real Fashion-MNIST root and a per-test seed."""

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported; without CUDA the kernels run on the CPU
# interpreter, so set it before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# CI sets NIN_DATA_DIR; a checkout next to the shared data finds it without.
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("NIN_DATA_DIR", DEFAULT_DATA)).resolve()
    if not (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real Fashion-MNIST not found at {root}: set NIN_DATA_DIR")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
