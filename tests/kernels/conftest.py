"""Kernel tests run on the Triton interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before anything imports triton: ``@triton.jit`` reads it when a
kernel is defined, so this file sets it at import, ahead of the test modules (which import kernels).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
