"""model.kernel=triton (the fused kernels) against model.kernel=torch on the same NiN and batch."""

import dataclasses
import logging

import pytest
import torch

from nin_dist.config import ModelConfig
from nin_dist.model import NiN, build_model, init_weights

# The CPU config's network (configs/cpu.yaml), at 28 x 28.
CPU_MODEL = ModelConfig(width=0.25, dropout=0.1, batchnorm=True, stem_kernel=5, stem_stride=1, stem_padding=2)


@pytest.mark.parametrize("channels_last, logit_relu", [(False, True), (True, True), (True, False)])
def test_triton_and_torch_give_the_same_outputs_and_gradients(channels_last, logit_relu):
    cfg = dataclasses.replace(CPU_MODEL, logit_relu=logit_relu)
    torch.manual_seed(0)
    torch_model = NiN(cfg).double()
    init_weights(torch_model)
    triton_model = NiN(cfg).double()
    triton_model.load_state_dict(torch_model.state_dict())
    triton_model.set_kernel("triton")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64).to(memory_format=fmt)  # 2 x 28 x 28 pixels per block
    labels = torch.randint(0, 10, (2,))
    grads = {}
    for name, model in (("torch", torch_model), ("triton", triton_model)):
        model.train()
        model.set_dropout_rows(0, 2, seed=11)  # the same dropout mask in both
        out = model(x)
        torch.nn.functional.cross_entropy(out, labels).backward()
        grads[name] = (out.detach(), {k: p.grad for k, p in model.named_parameters()})
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=1e-9, atol=1e-12)
    assert grads["triton"][1].keys() == grads["torch"][1].keys()
    for key, ref in grads["torch"][1].items():
        torch.testing.assert_close(grads["triton"][1][key], ref, rtol=1e-8, atol=1e-12, msg=key)


def test_kernel_switch_keeps_state_dict_keys():
    model = NiN(CPU_MODEL)
    keys = list(model.state_dict())
    model.set_kernel("triton")
    assert list(model.state_dict()) == keys


def test_kernel_triton_on_cpu_uses_the_interpreter():
    assert build_model(CPU_MODEL.__class__(kernel="triton"), "cpu").kernel == "triton"


def test_on_cuda_what_cannot_win_goes_to_cudnn():
    """The CUDA dispatch rule, a pure function of channels, dtype and PyTorch's TF32 setting."""
    from kernels.ops import cudnn_instead

    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, True), (torch.float32, True)):
        assert cudnn_instead(96, dtype, tf32) is None and cudnn_instead(384, dtype, tf32) is None
        assert cudnn_instead(16, dtype, tf32) is None  # one tensor-core tile: the smallest that runs fused
        assert "10 channels" in cudnn_instead(10, dtype, tf32)  # NiN's head
    assert "TF32 off" in cudnn_instead(256, torch.float32, False)
    assert "float64" in cudnn_instead(256, torch.float64, True)


def test_the_cuda_paths_are_logged_once_in_one_line(caplog):
    model = NiN()  # the seed's widths: 96, 256, 384 and the 10-class head
    model.set_kernel("triton")
    with caplog.at_level(logging.INFO, logger="nin_dist.model"):
        for _ in range(2):
            model.log_paths(torch.bfloat16, False)
    assert [r.getMessage() for r in caplog.records] == [
        "model.kernel=triton on CUDA, bfloat16: C=96 fused Triton; C=256 fused Triton; C=384 fused Triton; "
        "C=10 cuDNN (10 channels, fewer than the 16 of a tensor-core tile)"]
    ieee = model.describe_paths(torch.float32, allow_tf32=False)
    assert ieee.startswith("model.kernel=triton on CUDA, float32, TF32 off: C=96 cuDNN (fp32 with TF32 off")
    assert ieee.count("cuDNN") == 4
    no_relu = NiN(dataclasses.replace(ModelConfig(), logit_relu=False)).describe_paths(torch.float16, False)
    assert no_relu.endswith("C=10 cuDNN (no final ReLU)")


@pytest.mark.parametrize("name", ["quick", "best"])
def test_the_cpu_recipes_networks_run_the_fused_kernel_on_a_gpu(name):
    """configs/quick.yaml and best.yaml are chosen on a CPU; on a GPU their 1x1 pairs run the fused kernel
    (every block but the 10-class head, which has no final ReLU there)."""
    from pathlib import Path

    from nin_dist.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    paths = NiN(cfg.model).describe_paths(torch.bfloat16, False)
    widths = cfg.model.block_widths
    assert paths.endswith("; ".join([*(f"C={c} fused Triton" for c in widths), "C=10 cuDNN (no final ReLU)"]))
