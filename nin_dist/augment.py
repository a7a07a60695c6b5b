"""Training augmentation on the device, for a whole batch at once: random translate and random erasing.

Each epoch draws the parameters of every position of its permutation from a generator seeded by
(seed, epoch) alone, as the permutation and the flips are (`nin_dist.data.epoch_order`), and each
step's ranks take their rows of the global batch: the image at global position i of an epoch draws
the same shift and the same rectangle however many processes share the batch, and a resumed run
draws what the uninterrupted run drew (no RNG state to carry). Drawing once per epoch costs a few
numbers per image and leaves each step only the applying: one window pick (translate) and one
masked fill (erase) over the batch, with no loop over images.

Both act on the 28 x 28 images (the trainer gives them the uint8 pixels; any dtype works), before
scaling, normalising and resizing (`nin_dist.data`), so `data.translate` is in pixels of the
original image and an erased or uncovered pixel is 0, the background of Fashion-MNIST.

- Translate (`data.translate=T`): each image moves by (dy, dx), each uniform in {-T..T}; what moves
  out of the frame is lost and what comes in is zero: a random crop of the image zero-padded by T.
- Erase (`data.erase=P`, Zhong et al. 2017, "Random Erasing Data Augmentation"): with probability P
  an image loses one rectangle, of area uniform in [2%, 40%] of the image and aspect ratio
  log-uniform in [0.3, 1/0.3]. Where the paper draws again until the rectangle fits, its sides are
  clipped to the image here (a fixed number of draws per image keeps every rank's stream aligned).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from nin_dist.config import DataConfig

ERASE_AREA = (0.02, 0.4)  # fraction of the image
ERASE_ASPECT = (0.3, 1 / 0.3)  # height / width


def augment_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws: its own stream, apart from the data order's and dropout's."""
    digest = hashlib.blake2b(f"augment/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: any torch generator takes it


@dataclass(frozen=True)
class Draws:
    """The augmentation of each position of an epoch, one row per image (int64, on the data's device)."""

    shift: torch.Tensor  # [B, 2]: (dy, dx), content moves down / right by that many pixels
    box: torch.Tensor  # [B, 4]: erased rectangle (top, left, height, width); height 0 = nothing erased

    def rows(self, lo: int, hi: int) -> Draws:
        """The draws of positions lo..hi (one rank's part of one global batch)."""
        return Draws(self.shift[lo:hi], self.box[lo:hi])


def draw(cfg: DataConfig, images: int, side: int, seed: int, epoch: int, device: torch.device) -> Draws:
    """The draws of the `images` positions of one epoch of `side` x `side` images."""
    gen = torch.Generator(device=device).manual_seed(augment_seed(seed, epoch))
    shift = torch.randint(-cfg.translate, cfg.translate + 1, (images, 2), generator=gen, device=device)
    u = torch.rand((images, 5), generator=gen, device=device, dtype=torch.float64)
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 0]) * side * side
    aspect = torch.exp(math.log(ERASE_ASPECT[0]) + (math.log(ERASE_ASPECT[1]) - math.log(ERASE_ASPECT[0])) * u[:, 1])
    height = (area * aspect).sqrt().round().clamp(1, side)
    width = (area / aspect).sqrt().round().clamp(1, side)
    top = (u[:, 2] * (side - height + 1)).floor()
    left = (u[:, 3] * (side - width + 1)).floor()
    height = torch.where(u[:, 4] < cfg.erase, height, 0.0)
    return Draws(shift, torch.stack([top, left, height, width], 1).long())


def translate(x: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """x [B, H, W] with image b moved by shift[b] = (dy, dx): out[b, i, j] = x[b, i - dy, j - dx], 0 outside.

    `pad` bounds |dy| and |dx| (data.translate): the zero frame the shifted windows are read from.
    Every H x W window of the padded batch is a view (unfold copies nothing); indexing picks one
    window per image, which copies whole rows (~4x faster on the CPU than a gather of every pixel)."""
    batch, height, width = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    windows = padded.unfold(1, height, 1).unfold(2, width, 1)  # [B, 2 pad + 1, 2 pad + 1, H, W]
    return windows[torch.arange(batch, device=x.device), pad - shift[:, 0], pad - shift[:, 1]]


def erase(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """x [B, H, W] with each image's rectangle box[b] = (top, left, height, width) set to 0."""
    top, left, height, width = (box[:, k, None] for k in range(4))  # [B, 1] each
    ys = torch.arange(x.shape[1], device=x.device)
    xs = torch.arange(x.shape[2], device=x.device)
    rows = (ys >= top) & (ys < top + height)  # [B, H]: the rows the rectangle spans
    cols = (xs >= left) & (xs < left + width)  # [B, W]
    return x.masked_fill(rows[:, :, None] & cols[:, None, :], 0.0)


def apply(x: torch.Tensor, draws: Draws, cfg: DataConfig) -> torch.Tensor:
    """x [B, H, W] translated, then erased (an erased rectangle never moves out of the frame)."""
    if cfg.translate:
        x = translate(x, draws.shift, cfg.translate)
    return erase(x, draws.box) if cfg.erase else x
