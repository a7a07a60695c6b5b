"""The NiN network in the seed's exact `nn.Sequential` layout.

`NiN()` with no arguments is the seed's `net`: four NiN blocks (k x k conv + two 1x1 convs, each
followed by ReLU), max-pools between them, dropout before the last block, global average pooling.
Its state_dict keys (`0.0.weight`, `0.2.weight`, ..., `7.4.bias`) equal the seed's, so a d2l
checkpoint loads unchanged.

The kernel switch (`model.kernel`) only changes how a block's two 1x1 convs are computed: `torch`
runs the block's layers as they are; `triton` runs the k x k conv, then one fused Triton kernel for
ReLU -> 1x1 -> ReLU -> 1x1 -> ReLU on the same parameters. On CUDA, `triton` leaves to cuDNN the
blocks the kernel cannot win (`kernels.ops.cudnn_instead`: the 10-channel head, fp32 without TF32);
`describe_paths` says which, and the trainer logs it once.

`python -m nin_dist.model --trace` prints the layer-by-layer output shapes in the seed's format.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys

import torch
from torch import nn

from nin_dist.config import ModelConfig
from nin_dist.errors import ConfigError
from nin_dist.layers import CrossRankBatchNorm2d, GlobalBatchDropout
from nin_dist.profiling import region
from nin_dist.shapes import NUM_CLASSES, POOL_KERNEL, POOL_STRIDE, flops_per_image

log = logging.getLogger(__name__)

DROPOUT_LAYER = 6  # the seed's nn.Dropout, before the last block
# What a profile calls each top-level layer (nin_dist.profiling.region); a block's parts are named below it.
_REGIONS = ("block1", "pool1", "block2", "pool2", "block3", "pool3", "dropout", "block4", "avgpool", "flatten")


def nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
              batchnorm: bool = False, final_relu: bool = True) -> nn.Sequential:
    """k x k conv (+ optional BatchNorm), ReLU, then two 1x1 conv + ReLU pairs.

    `final_relu=False` puts an Identity in the last ReLU's place, so layer indices (and the
    state_dict keys) stay the seed's.
    """
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)]
    if batchnorm:
        layers.append(CrossRankBatchNorm2d(out_channels))
    layers += [nn.ReLU(),
               nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
               nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU() if final_relu else nn.Identity()]
    return nn.Sequential(*layers)


class NiN(nn.Sequential):
    """The seed's network; `cfg` changes widths, later kernels, dropout, BatchNorm, stem and the kernel
    switch. Blocks 2-4's odd k x k convs pad k // 2, so they keep the size (the seed's 5, 3, 3 do)."""

    def __init__(self, cfg: ModelConfig | None = None, in_channels: int = 1):
        cfg = cfg or ModelConfig()
        c1, c2, c3 = cfg.block_widths
        k2, k3, k4 = cfg.kernels
        bn = cfg.batchnorm
        super().__init__(
            nin_block(in_channels, c1, cfg.stem_kernel, cfg.stem_stride, cfg.stem_padding, bn),
            nn.MaxPool2d(POOL_KERNEL, stride=POOL_STRIDE),
            nin_block(c1, c2, kernel_size=k2, stride=1, padding=k2 // 2, batchnorm=bn),
            nn.MaxPool2d(POOL_KERNEL, stride=POOL_STRIDE),
            nin_block(c2, c3, kernel_size=k3, stride=1, padding=k3 // 2, batchnorm=bn),
            nn.MaxPool2d(POOL_KERNEL, stride=POOL_STRIDE),
            GlobalBatchDropout(cfg.dropout),
            nin_block(c3, NUM_CLASSES, kernel_size=k4, stride=1, padding=k4 // 2, batchnorm=bn,
                      final_relu=cfg.logit_relu),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        )
        # Index of the k x k conv's last pre-ReLU layer (the conv, or its BatchNorm) in each block.
        self._stem_end = 2 if bn else 1
        self.kernel = "torch"
        self._logged_paths: set[tuple[torch.dtype, bool]] = set()

    def set_dropout_rows(self, offset: int, global_rows: int, seed: int) -> None:
        """Which rows of the global batch this rank holds, and the step's dropout seed."""
        self[DROPOUT_LAYER].set_rows(offset, global_rows, seed)  # every step: no walk over the modules

    def set_kernel(self, kernel: str) -> None:
        """'torch' or 'triton'; never changes parameters or state_dict keys."""
        if kernel not in ("torch", "triton"):
            raise ValueError(f"kernel must be 'torch' or 'triton', got {kernel!r}")
        self.kernel = kernel
        if kernel == "triton" and torch.cuda.is_available():  # imports torch._dynamo: not on CPU machines
            torch.compiler.assume_constant_result(_tf32_for_convs)

    def portable_copy(self) -> NiN:
        """A copy that runs anywhere: on the CPU, fp32, eval mode, PyTorch's own layers (no Triton)."""
        model = copy.deepcopy(self).cpu().float().eval()
        model.set_kernel("torch")
        return model

    def _cudnn_instead(self, block: nn.Sequential, dtype: torch.dtype, allow_tf32: bool) -> str | None:
        """Why `block` runs as PyTorch layers under model.kernel=triton on CUDA, or None if fused."""
        if not isinstance(block[-1], nn.ReLU):
            # The fused kernel always ends in ReLU; a block without it (model.logit_relu=false, the
            # 10-channel head: a sliver of the FLOPs) runs as PyTorch layers.
            return "no final ReLU"
        from kernels.ops import cudnn_instead

        return cudnn_instead(block[self._stem_end + 1].out_channels, dtype, allow_tf32)

    def describe_paths(self, dtype: torch.dtype, allow_tf32: bool) -> str:
        """One line: what each block's 1x1 pair runs on CUDA under model.kernel=triton, for the
        compute dtype (the autocast dtype, else the parameters') and PyTorch's TF32 setting."""
        parts = []
        for layer in self:
            if isinstance(layer, nn.Sequential):
                reason = self._cudnn_instead(layer, dtype, allow_tf32)
                path = "fused Triton" if reason is None else f"cuDNN ({reason})"
                parts.append(f"C={layer[self._stem_end + 1].out_channels} {path}")
        tf32 = f", TF32 {'on' if allow_tf32 else 'off'}" if dtype == torch.float32 else ""
        return f"model.kernel=triton on CUDA, {str(dtype).removeprefix('torch.')}{tf32}: " + "; ".join(parts)

    def log_paths(self, dtype: torch.dtype, allow_tf32: bool) -> None:
        """Log `describe_paths` once per (dtype, TF32 setting) this model is asked about."""
        if (dtype, allow_tf32) not in self._logged_paths:
            self._logged_paths.add((dtype, allow_tf32))
            log.info("%s", self.describe_paths(dtype, allow_tf32))

    def _pair_as_layers(self, block: nn.Sequential, x: torch.Tensor) -> bool:
        """Whether `block`'s 1x1 pair runs as PyTorch layers (see _cudnn_instead), not the fused op."""
        if self.kernel == "torch" or not isinstance(block[-1], nn.ReLU):
            return True
        if not x.is_cuda:  # the CPU (the interpreter) runs every block with a final ReLU fused, as tests need
            return False
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return self._cudnn_instead(block, dtype, _tf32_for_convs()) is not None

    def _block(self, block: nn.Sequential, x: torch.Tensor, name: str) -> torch.Tensor:
        # Its layers one by one (nn.Sequential's forward), in the regions a profile shows (nin_dist.profiling).
        layers = tuple(block)  # indexing an nn.Sequential walks its modules each time
        conv_name, bn_name, pair_name = _part_names(name, layers[0].kernel_size)
        with region(conv_name):
            x = layers[0](x)
        if self._stem_end == 2:
            with region(bn_name):
                x = layers[1](x)
        with region(pair_name):
            if self._pair_as_layers(block, x):
                for layer in layers[self._stem_end:]:
                    x = layer(x)
                return x
            from kernels import fused_pointwise_mlp

            conv1, conv2 = layers[self._stem_end + 1], layers[self._stem_end + 3]
            # The fused op takes the stem's ReLU on load (relu_input=True).
            return fused_pointwise_mlp(x, conv1.weight, conv1.bias, conv2.weight, conv2.bias, relu_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self):
            name = _REGIONS[i]
            if isinstance(layer, nn.Sequential):
                with region(name):
                    x = self._block(layer, x, name)
            else:
                with region(name):
                    x = layer(x)
        return x


def _part_names(block: str, kernel_size: tuple[int, int]) -> tuple[str, str, str]:
    """A block's regions: its k x k conv, its BatchNorm, its 1x1 pair (with the ReLU before it). Not cached:
    a few string formats a step, and torch.compile warns on (and ignores) a cache wrapper it traces."""
    return f"{block}/conv{kernel_size[0]}x{kernel_size[1]}", f"{block}/batchnorm", f"{block}/pair1x1"


def _tf32_for_convs() -> bool:
    """kernels.ops.conv_allows_tf32, which torch.compile cannot trace (torch.backends' precision
    properties): `set_kernel` marks this wrapper a constant, read once when a graph is traced. A run
    sets its TF32 policy before its first step, so the constant holds."""
    from kernels.ops import conv_allows_tf32

    return conv_allows_tf32()


def init_weights(model: nn.Module) -> None:
    """The seed's init (d2l.train_ch6): Xavier-uniform conv/linear weights, PyTorch's default biases."""
    for m in model.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when the kernels import, else 'torch'."""
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return "torch"
    try:
        from kernels.ops import INTERPRETED
    except ImportError as err:
        if kernel == "auto":
            return "torch"
        raise ConfigError(f"model.kernel=triton: the Triton kernels cannot be imported ({err})") from None
    if device.type != "cuda" and not INTERPRETED:
        raise ConfigError("model.kernel=triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                          "use model.kernel=auto or torch")
    return "triton"


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> NiN:
    """NiN on `device` with the seed's init and the resolved kernel switch."""
    device = torch.device(device)
    model = NiN(cfg)
    init_weights(model)
    model.set_kernel(resolve_kernel(cfg.kernel, device))
    return model.to(device)


def _torch_layer_name(layer: nn.Module) -> str:
    """The torch.nn class a layer is (ours subclass them), so the table reads like the seed's."""
    return next(c.__name__ for c in type(layer).__mro__ if c.__module__.startswith("torch.nn"))


def trace(model: nn.Sequential, size: int = 224) -> list[str]:
    """The seed's shape table: one `<Layer> output shape:\\t <shape>` line per top-level layer."""
    x = torch.rand(1, 1, size, size)
    lines = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            lines.append(f"{_torch_layer_name(layer)} output shape:\t {x.shape}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nin_dist.model", description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="print layer output shapes (the seed's table)")
    parser.add_argument("--size", type=int, default=224, help="input side, pixels")
    args = parser.parse_args(argv)
    cfg = ModelConfig()
    model = NiN(cfg).eval()
    if args.trace:
        print("\n".join(trace(model, args.size)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}  forward GFLOP/image at {args.size}: "
          f"{flops_per_image(cfg.block_widths, cfg.kernels, cfg.stem, args.size) / 1e9:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
