"""NiN against the seed: its shape table, its state_dict keys and outputs, its parameter count."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from nin_dist.config import ModelConfig
from nin_dist.model import NiN, build_model
from nin_dist.shapes import feature_sizes, flops_per_image, smallest_input_size

# The seed's table (../shared/seed, cell 5), line for line.
SEED_TABLE = """\
Sequential output shape:\t torch.Size([1, 96, 54, 54])
MaxPool2d output shape:\t torch.Size([1, 96, 26, 26])
Sequential output shape:\t torch.Size([1, 256, 26, 26])
MaxPool2d output shape:\t torch.Size([1, 256, 12, 12])
Sequential output shape:\t torch.Size([1, 384, 12, 12])
MaxPool2d output shape:\t torch.Size([1, 384, 5, 5])
Dropout output shape:\t torch.Size([1, 384, 5, 5])
Sequential output shape:\t torch.Size([1, 10, 5, 5])
AdaptiveAvgPool2d output shape:\t torch.Size([1, 10, 1, 1])
Flatten output shape:\t torch.Size([1, 10])"""


def seed_net() -> nn.Sequential:
    """Built exactly as the seed builds `net` (nin_block + nn.Sequential, same arguments)."""
    def nin_block(in_channels, out_channels, kernel_size, strides, padding):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())

    return nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0), nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2), nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1), nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        nin_block(384, 10, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())


def test_trace_cli_prints_the_seed_table():
    out = subprocess.run([sys.executable, "-m", "nin_dist.model", "--trace"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines() == SEED_TABLE.splitlines()


def test_seed_state_dict_loads_strict_and_gives_identical_outputs(tmp_path):
    seed = seed_net()
    torch.save(seed.state_dict(), tmp_path / "seed.pt")
    ours = NiN()
    assert list(ours.state_dict()) == list(seed.state_dict())
    ours.load_state_dict(torch.load(tmp_path / "seed.pt", weights_only=True), strict=True)
    x = torch.rand(2, 1, 224, 224)
    seed.eval()
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), seed(x))


def test_parameter_count_matches_the_seed():
    assert sum(p.numel() for p in NiN().parameters()) == 1_992_166
    assert sum(p.numel() for p in seed_net().parameters()) == 1_992_166


def test_init_is_xavier_uniform_with_default_biases():
    model = build_model(ModelConfig(), "cpu")
    w = model[0][0].weight  # 96 x 1 x 11 x 11
    bound = (6.0 / (1 * 121 + 96 * 121)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    b = model[0][0].bias  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert b.abs().max() <= 1 / 121 ** 0.5


def test_width_batchnorm_and_stem_change_shapes_not_structure():
    cfg = ModelConfig(width=0.25, batchnorm=True, stem_kernel=5, stem_stride=1, stem_padding=2)
    model = NiN(cfg)
    assert [type(m).__name__ for m in model[0]][:3] == ["Conv2d", "CrossRankBatchNorm2d", "ReLU"]
    out = model.eval()(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert feature_sizes(cfg.stem, 28) == [28, 13, 13, 6, 6, 2, 2]


@pytest.mark.parametrize("cfg, smallest", [(ModelConfig(), 67), (ModelConfig(stem_kernel=5, stem_stride=1,
                                                                                    stem_padding=2), 15)])
def test_smallest_input_size_is_tight(cfg, smallest):
    assert smallest_input_size(cfg.stem) == smallest
    NiN(cfg).eval()(torch.rand(1, 1, smallest, smallest))  # runs
    with pytest.raises(RuntimeError):
        NiN(cfg).eval()(torch.rand(1, 1, smallest - 1, smallest - 1))


# A network of chosen widths and later kernels (model.widths, model.kernels), with BatchNorm and the
# 28-pixel stem: every count below must follow them, not the seed's 96/256/384 and 5/3/3.
CHOSEN = ModelConfig(widths=(24, 40, 72), kernels=(3, 7, 1), batchnorm=True, stem_kernel=5, stem_stride=1,
                     stem_padding=2)


@pytest.mark.parametrize("cfg, size", [(ModelConfig(), 224), (CHOSEN, 28)], ids=["seed", "chosen"])
def test_flops_match_a_count_from_the_layers(cfg, size):
    # Independent count: hooks on every Conv2d of the real module.
    model, total = NiN(cfg), []

    def hook(m, inp, out):
        total.append(2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    model.eval()(torch.rand(1, 1, size, size))
    assert flops_per_image(cfg.block_widths, cfg.kernels, cfg.stem, size) == pytest.approx(sum(total))
    if cfg == ModelConfig():
        assert sum(total) == pytest.approx(1.52e9, rel=0.01)  # DESIGN.md's count


def test_chosen_widths_and_kernels_build_those_layers_and_keep_the_sizes():
    model = NiN(CHOSEN).eval()
    assert list(model.state_dict()) == list(NiN(ModelConfig(batchnorm=True)).state_dict())  # the seed's layout
    blocks = [model[i] for i in (0, 2, 4, 7)]
    assert [b[0].out_channels for b in blocks] == [24, 40, 72, 10]
    assert [b[0].kernel_size for b in blocks] == [(5, 5), (3, 3), (7, 7), (1, 1)]
    assert [b[3].in_channels for b in blocks] == [24, 40, 72, 10]  # the 1x1 pairs follow the widths
    x, sides = torch.rand(2, 1, 28, 28), []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            sides.append(x.shape[-1])
    assert sides[:7] == feature_sizes(CHOSEN.stem, 28)  # blocks 2-4 keep the size whatever their odd kernel
    assert x.shape == (2, 10)


def test_kernel_switch_keeps_parameters_and_keys():
    model = NiN()
    keys = list(model.state_dict())
    model.set_kernel("torch")
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError):
        model.set_kernel("cuda")
    assert build_model(ModelConfig(kernel="auto"), "cpu").kernel == "torch"  # auto on the CPU


def test_without_logit_relu_the_seed_weights_give_the_pre_relu_class_scores():
    seed = seed_net().eval()
    ours = NiN(ModelConfig(logit_relu=False)).eval()
    ours.load_state_dict(seed.state_dict(), strict=True)  # same keys: the ReLU's place holds an Identity
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        features = seed[:7](x)
        head = seed[7]
        expected = head[:5](features).mean(dim=(2, 3))  # the last block up to, not including, its last ReLU
        scores = ours(x)
    torch.testing.assert_close(scores, expected)
    assert (scores < 0).any()  # the seed's head could never produce these


@pytest.mark.parametrize("logit_relu, silenced_grad_is_zero", [(True, True), (False, False)])
def test_a_class_channel_pushed_below_zero_learns_only_without_logit_relu(logit_relu, silenced_grad_is_zero):
    torch.manual_seed(0)
    model = NiN(ModelConfig(width=0.25, dropout=0.0, stem_kernel=5, stem_stride=1, stem_padding=2,
                            logit_relu=logit_relu))
    last_conv = model[7][4]
    with torch.no_grad():
        last_conv.bias[6] = -1e3  # class 6's score is negative at every pixel
    x, labels = torch.rand(8, 1, 28, 28), torch.full((8,), 6)
    nn.functional.cross_entropy(model(x), labels).backward()
    grad = torch.cat([last_conv.weight.grad[6].flatten(), last_conv.bias.grad[6:7]])
    assert (grad.abs().max() == 0) == silenced_grad_is_zero
