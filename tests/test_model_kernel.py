"""model.kernel=triton (the fused kernels) against model.kernel=torch on the same NiN and batch."""

import dataclasses

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
