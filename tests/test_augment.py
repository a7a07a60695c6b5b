"""Training augmentation: the batched ops against a per-image reference, and draws that depend only on
(seed, epoch, position in the epoch), so 1 and N processes, and a resumed run, see the same images."""

from __future__ import annotations

import pytest
import torch

from nin_dist import augment
from nin_dist.config import DataConfig
from nin_dist.data import TrainBatches, epoch_order, load_split

SIDE = 28
CPU = torch.device("cpu")
AUGMENTED = DataConfig(resize=28, augment=True, flip=True, translate=3, erase=0.5)


def reference_translate(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """One image moved down by dy and right by dx, zeros where nothing moved in: plain slicing."""
    out = torch.zeros_like(image)
    h, w = image.shape
    out[max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)] = image[max(0, -dy): h - max(0, dy),
                                                                        max(0, -dx): w - max(0, dx)]
    return out


def reference_augment(images: torch.Tensor, draws: augment.Draws) -> torch.Tensor:
    """The batch one image at a time: translate, then zero the rectangle."""
    out = []
    for image, (dy, dx), (top, left, height, width) in zip(images, draws.shift.tolist(), draws.box.tolist(),
                                                            strict=True):
        moved = reference_translate(image, dy, dx)
        moved[top: top + height, left: left + width] = 0.0
        out.append(moved)
    return torch.stack(out)


@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 123)])
def test_batched_augmentation_equals_the_per_image_reference(seed, epoch):
    images = torch.rand(64, SIDE, SIDE)
    draws = augment.draw(AUGMENTED, 64, SIDE, seed, epoch, device=CPU)
    assert torch.equal(augment.apply(images, draws, AUGMENTED), reference_augment(images, draws))


def test_draws_cover_their_ranges():
    draws = augment.draw(AUGMENTED, 4096, SIDE, seed=0, epoch=0, device=CPU)
    assert set(draws.shift.flatten().tolist()) == set(range(-3, 4))  # every shift of {-3..3}, nothing else
    top, left, height, width = draws.box.T
    erased = height > 0
    assert abs(erased.float().mean().item() - 0.5) < 0.03  # data.erase=0.5
    assert (top + height <= SIDE).all() and (left + width <= SIDE).all() and (top >= 0).all() and (left >= 0).all()
    area = (height * width)[erased].double() / SIDE**2
    # Area 2-40% of the image, up to the rounding of the sides and the clipping of long thin rectangles.
    assert area.min() > 0.005 and area.max() < 0.45 and abs(area.mean().item() - 0.21) < 0.02
    aspect = (height.double() / width)[erased & (height < SIDE) & (width < SIDE)]
    assert 0.2 < aspect.min() and aspect.max() < 5 and abs(aspect.log().mean().item()) < 0.05  # symmetric in log


def test_translate_zero_and_erase_zero_leave_the_images_unchanged():
    images = torch.rand(16, SIDE, SIDE)
    off = DataConfig(resize=28, augment=True, translate=0, erase=0.0)
    assert torch.equal(augment.apply(images, augment.draw(off, 16, SIDE, 0, 0, CPU), off), images)


def test_draws_depend_on_seed_and_epoch_only():
    def shifts(seed, epoch):
        return augment.draw(AUGMENTED, 32, SIDE, seed, epoch, CPU).shift

    assert torch.equal(shifts(1, 2), shifts(1, 2))
    for other in ((2, 2), (1, 3)):
        assert not torch.equal(shifts(1, 2), shifts(*other)), other


@pytest.fixture(scope="module")
def train_split(data_root):
    return load_split(data_root, "train", limit=256)


def _epoch(split, rank: int, world: int, epoch: int = 1, start: int = 0) -> list[torch.Tensor]:
    return [x for x, _ in TrainBatches(split, AUGMENTED, 32, rank, world, seed=5).epoch(epoch, start)]


def test_two_ranks_draw_what_one_process_draws(train_split):
    one = _epoch(train_split, 0, 1)
    halves = [_epoch(train_split, rank, 2) for rank in (0, 1)]
    for step, whole in enumerate(one):
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), whole), step
    four = [_epoch(train_split, rank, 4) for rank in range(4)]
    assert all(torch.equal(torch.cat([part[s] for part in four]), one[s]) for s in range(len(one)))


def test_a_resumed_epoch_draws_what_the_whole_epoch_drew(train_split):
    whole = _epoch(train_split, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(_epoch(train_split, 0, 1, start=3), whole[3:], strict=True))


def test_augmented_batches_are_the_reference_applied_to_the_plain_images(train_split):
    """The whole pipeline, step 0: scale, translate + erase (the reference), then the epoch's flips."""
    gen = epoch_order(len(train_split), 5, 1)  # the epoch's permutation, then its flips, on one generator
    order = torch.randperm(len(train_split), generator=gen)
    flip = (torch.rand(len(train_split), generator=gen) < 0.5)[:32]
    images = train_split.images[order[:32]].float() / 255.0
    expected = reference_augment(images, augment.draw(AUGMENTED, len(train_split), SIDE, 5, 1, CPU).rows(0, 32))
    expected = torch.where(flip.view(-1, 1, 1), expected.flip(-1), expected)
    assert torch.equal(_epoch(train_split, 0, 1)[0], expected.unsqueeze(1))
