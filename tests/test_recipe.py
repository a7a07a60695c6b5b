"""The training recipe in real runs: a validation split, augmentation, an EMA of the weights and mirror TTA.

All of it on at once, in fp64 (see tests/test_distributed.py for why): a 2-process torchrun job is
the reference; one process computes the same to ~1e-12, and a job whose rank 1 is SIGKILLed
mid-epoch and restarted by torchrun ends bit-identical to it, the EMA included.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_bit_identical,
    finish,
    kill_rank_after_checkpoint,
    last_checkpoint,
    max_rel_diff,
    overrides,
    run,
    standalone,
    start,
    torchrun_cmd,
)

from nin_dist import checkpoint as ckpt
from nin_dist.config import load_config
from nin_dist.data import hold_out, load_datasets
from nin_dist.distributed import DistInfo
from nin_dist.evaluate import evaluate
from nin_dist.model import NiN
from nin_dist.scoring import Scorer

STEPS_PER_EPOCH = 12
VAL = 48
# 192 images trained on in global batches of 16, 48 held out, every part of the recipe on.
RECIPE = {"data__train_limit": 16 * STEPS_PER_EPOCH + VAL, "data__val_size": VAL, "data__test_limit": 100,
          "train__batch_size": 16, "train__epochs": 2, "train__precision": "fp64", "train__log_every": 50,
          "data__augment": True, "data__flip": True, "data__translate": 2, "data__erase": 0.5,
          "train__ema_decay": 0.9, "train__tta": True, "model__dropout": 0.1, "model__width": 0.25}
# fp64 parameters; what is left is the rounding of sums over 2 x 8 images against sums over 16.
REL_TOL = 1e-11
WORLD_OF_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                        backend=None)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _held_out_digest(text: str) -> str:
    (digest,) = re.findall(rf"{VAL} training images held out for validation \(stratified by class, seed 0; "
                           rf"indices (\w+)\)", text)
    return digest


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "two"
    rc, text = standalone(2, overrides(out, **RECIPE), extra=["--tee=3"], timeout=300)
    assert rc == 0, text[-4000:]
    return {"out": out, "text": text, "state": last_checkpoint(out)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A plain `nin-train` process (its log is read, so not in this one)."""
    out = tmp_path_factory.mktemp("recipe") / "one"
    rc, text = run([sys.executable, "-m", "nin_dist.train", *overrides(out, **RECIPE)], timeout=300)
    assert rc == 0, text[-4000:]
    return {"out": out, "text": text, "state": last_checkpoint(out)}


@pytest.mark.slow
def test_one_process_equals_two_with_the_whole_recipe_on(one_process, two_processes):
    one, two = one_process["state"], two_processes["state"]
    assert one[ckpt.STEP] == two[ckpt.STEP] == 2 * STEPS_PER_EPOCH
    for what in (ckpt.MODEL, ckpt.EMA):
        diff = max_rel_diff(one[what], two[what])
        print(f"\n1 process vs 2, augmentation + EMA + TTA, {2 * STEPS_PER_EPOCH} fp64 steps, {what}: "
              f"max relative difference {diff[0]:.2e} ({diff[1]})")
        assert diff[0] < REL_TOL, (what, diff)
    # Both ranks hold out the images one process holds out: rank 1 scores the second half of them.
    assert _held_out_digest(one_process["text"]) == _held_out_digest(two_processes["text"])
    m1, m2 = _metrics(one_process["out"]), _metrics(two_processes["out"])
    for split in ("val", "test"):
        assert m1[f"{split}_acc"] == m2[f"{split}_acc"] and abs(m1[f"{split}_loss"] - m2[f"{split}_loss"]) < 1e-6


def test_each_epoch_reports_val_and_test_only_at_the_end(two_processes):
    text = two_processes["text"]
    first = re.search(r"\[rank 0\] epoch 1/2  train loss \S+ acc \S+ \| val loss \S+ acc \S+ \(48 images\) \| "
                      r"\d+ img/s", text)
    last = re.search(r"\[rank 0\] epoch 2/2  train loss \S+ acc \S+ \| val loss \S+ acc \S+ \(48 images\) \| "
                     r"test loss \S+ acc \S+ \(100 images\) \| \d+ img/s", text)
    assert first and last, text[-3000:]
    history = _metrics(two_processes["out"])["history"]
    assert [sorted(k for k in h if k.startswith(("val", "test"))) for h in history] == [
        ["val_acc", "val_loss"], ["test_acc", "test_loss", "val_acc", "val_loss"]]


def test_val_and_test_are_scored_with_the_ema_weights(one_process, data_root):
    """metrics.json's numbers are those of the checkpoint's EMA on the held-out images, with TTA."""
    _, config, *args = overrides(one_process["out"], **RECIPE, data__root=data_root)
    cfg = load_config(config, args)
    train, test = load_datasets(cfg.data)
    _, val = hold_out(train, VAL, cfg.seed)
    averaged, trained = (NiN(cfg.model).double() for _ in range(2))
    averaged.load_state_dict(one_process["state"][ckpt.EMA])
    trained.load_state_dict(one_process["state"][ckpt.MODEL])
    metrics = _metrics(one_process["out"])
    for split, name in ((val, "val"), (test, "test")):
        scored = evaluate(averaged, split, cfg.data, cfg.train, WORLD_OF_ONE)
        assert (scored.acc, scored.loss) == (metrics[f"{name}_acc"], metrics[f"{name}_loss"]), name
    assert evaluate(trained, val, cfg.data, cfg.train, WORLD_OF_ONE).loss != metrics["val_loss"]


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_resumes_bit_identically_with_the_ema(two_processes, tmp_path):
    out = tmp_path / "run"
    kill_after = STEPS_PER_EPOCH + 2  # a mid-epoch checkpoint in epoch 2
    job = start(torchrun_cmd(["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                             overrides(out, **RECIPE, train__checkpoint_every=kill_after)))
    path = kill_rank_after_checkpoint(job, out, kill_after, settle=0.3)  # rank 1, mid-epoch 2

    rc, text = finish(job, timeout=300)
    assert rc == 0, text[-4000:]
    assert f"resuming from {path} at epoch 2, step {kill_after}" in text, text[-4000:]
    final, reference = last_checkpoint(out), two_processes["state"]
    assert final[ckpt.STEP] == reference[ckpt.STEP]
    assert_bit_identical(final[ckpt.MODEL], reference[ckpt.MODEL])
    assert_bit_identical(final[ckpt.EMA], reference[ckpt.EMA])
    for a, b in zip(final[ckpt.OPTIMIZER]["state"].values(), reference[ckpt.OPTIMIZER]["state"].values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert _metrics(out)["val_loss"] == _metrics(two_processes["out"])["val_loss"]


@pytest.mark.parametrize("val_size, every_epoch, due", [(0, False, [True, True]), (10, False, [False, True]),
                                                        (10, True, [True, True])])
def test_test_is_scored_every_epoch_without_a_validation_split_or_when_asked(val_size, every_epoch, due):
    cfg = load_config(None, [f"data.val_size={val_size}", f"train.eval_test_every_epoch={every_epoch}"])
    scorer = Scorer(object() if val_size else None, object(), cfg, WORLD_OF_ONE)
    assert [scorer.test_due(last) for last in (False, True)] == due
