"""Evaluation with TTA: the mean of the views' probabilities (the mirror image; the image shifted), against
every view scored by hand, and the served classifier's TTA, the same computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_CONFIG

from nin_dist.classifier import RawImageClassifier
from nin_dist.config import load_config, replace
from nin_dist.data import load_split, to_inputs
from nin_dist.distributed import DistInfo
from nin_dist.evaluate import TTA, evaluate
from nin_dist.model import build_model

WORLD_OF_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                        backend=None)


@pytest.fixture(scope="module")
def trained(data_root):
    """(a network trained a little, its config). An input larger than 28 px: the network's input of the
    mirrored image is the mirror of its input, and a shift of the image is not a shift of the input."""
    cfg = load_config(CPU_CONFIG, ["data.resize=36", "model.width=0.25", "train.eval_batch_size=25",
                                   "train.precision=fp32", "train.channels_last=false"])
    torch.manual_seed(0)
    return _trained_a_little(build_model(cfg.model), load_split(data_root, "train", limit=512), cfg.data), cfg


def test_tta_scores_the_mean_of_the_image_and_mirror_probabilities(data_root, trained):
    split = load_split(data_root, "test", limit=60)
    model, cfg = trained
    model.eval()  # evaluate leaves it training (BatchNorm would normalise with the batch's statistics)
    with torch.no_grad():
        views = [F.softmax(model(to_inputs(images, cfg.data)), 1) for images in (split.images, split.images.flip(-1))]
    mean = (views[0] + views[1]) / 2
    tta = load_config(CPU_CONFIG, ["data.resize=36", "train.eval_batch_size=25", "train.tta=true",
                                   "train.precision=fp32", "train.channels_last=false"])
    scored = evaluate(model, split, cfg.data, tta.train, WORLD_OF_ONE, with_predictions=True)
    expected_loss = -mean[torch.arange(len(split)), split.labels].log().mean().item()
    assert abs(scored.loss - expected_loss) < 1e-5, (scored.loss, expected_loss)
    assert torch.equal(scored.predictions, mean.argmax(1))
    assert scored.acc == (mean.argmax(1) == split.labels).double().mean().item() and scored.count == 60

    # What the logged model serves averages the same way, to the bit (one batch, as evaluate scored it).
    with torch.no_grad():  # evaluate left the model training
        served = RawImageClassifier(model.eval(), cfg.data, TTA(mirror=True))(split.images[:25])
    assert torch.equal(served, scored.probabilities[:25])

    plain = evaluate(model, split, cfg.data, cfg.train, WORLD_OF_ONE)  # one view: the image itself
    expected_plain = -views[0][torch.arange(len(split)), split.labels].log().mean().item()
    assert abs(plain.loss - expected_plain) < 1e-5 and abs(plain.loss - scored.loss) > 1e-4


def shifted_by_hand(images: torch.Tensor, s: int) -> torch.Tensor:
    """uint8 [B, 28, 28] moved by (s, s) pixels (down and right for s > 0), zero fill: a zero-padded
    frame cropped, out[i, j] = images[i - s, j - s]."""
    padded = F.pad(images, (abs(s),) * 4)
    lo = abs(s) - s
    return padded[:, lo: lo + images.shape[1], lo: lo + images.shape[2]]


def test_tta_shifts_score_the_mean_over_the_shifted_views_and_their_mirrors(data_root, trained):
    split = load_split(data_root, "test", limit=12)
    images, labels = split.images, split.labels
    model, plain = trained
    model.eval()  # evaluate leaves it training (BatchNorm would normalise with the batch's statistics)
    assert torch.equal(shifted_by_hand(images, 2)[:, 2:, 2:], images[:, :-2, :-2])  # the reference moves as said
    assert torch.equal(shifted_by_hand(images, -2)[:, :-2, :-2], images[:, 2:, 2:])
    for mirror in (True, False):
        cfg = replace(plain, train={"tta": mirror, "tta_shifts": 2, "eval_batch_size": 8})  # 2 batches
        views = [images, shifted_by_hand(images, 2), shifted_by_hand(images, -2)]
        views += [view.flip(-1) for view in views] if mirror else []
        with torch.no_grad():
            mean = torch.stack([F.softmax(model.eval()(to_inputs(view, cfg.data)), 1) for view in views]).mean(0)
        scored = evaluate(model, split, cfg.data, cfg.train, WORLD_OF_ONE, with_predictions=True)
        expected_loss = -mean[torch.arange(len(split)), labels].log().mean().item()
        assert abs(scored.loss - expected_loss) < 1e-5, (mirror, scored.loss, expected_loss)
        torch.testing.assert_close(scored.probabilities, mean, atol=1e-6, rtol=0, msg=f"mirror={mirror}")
        assert torch.equal(scored.predictions, mean.argmax(1))
        unshifted = evaluate(model, split, cfg.data, replace(cfg, train={"tta_shifts": 0}).train, WORLD_OF_ONE)
        assert abs(unshifted.loss - scored.loss) > 1e-4, "the shifted views count"

        # The served classifier averages the same views, to the bit (one batch, as evaluate scored it).
        with torch.no_grad():  # evaluate left the model training
            served = RawImageClassifier(model.eval(), cfg.data, TTA.of(cfg.train))(images[:8, None])
        assert torch.equal(served, scored.probabilities[:8]), mirror


def _trained_a_little(model, train, data):
    """A few steps, so the two views' predictions are far from uniform and differ."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(16):
        index = torch.arange(32 * step, 32 * step + 32)
        opt.zero_grad()
        F.cross_entropy(model(to_inputs(train.images[index], data)), train.labels[index]).backward()
        opt.step()
    return model.eval()
