"""Shared fixtures: the real Fashion-MNIST root and a per-test seed."""

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported; without CUDA the kernels run on the CPU
# interpreter, so set it before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import data_dir  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return data_dir().resolve()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
