"""The trainer in one process: progress and epoch lines, exact resume, divergence, config changes,
exit codes, and the bf16 / channels_last / torch.compile paths.

Runs are in this process (`main(argv)`, no interpreter start-up) on the real data cut down to a few
batches; GPU-only paths carry `@pytest.mark.gpu` and skip without CUDA.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

import pytest
import torch
from helpers import (
    assert_bit_identical,
    data_dir,
    env,
    last_checkpoint,
    max_rel_diff,
    overrides,
    run,
    train_in_process,
)

from nin_dist import checkpoint as ckpt
from nin_dist.model import NiN

# 128 training images in global batches of 16: 8 steps per epoch; 200 test images.
TINY = {"data__train_limit": 128, "data__test_limit": 200, "train__batch_size": 16, "train__epochs": 2}
STEPS_PER_EPOCH = 8

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def metrics(out_dir) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def test_progress_bar_and_one_line_per_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(overrides(out, **TINY, train__progress="bar", train__log_every=2)) == 0
    err = capsys.readouterr().err
    # The tqdm bar: steps done of all steps, the last logged loss and the throughput.
    assert re.search(r"\b16/16 \[.*loss \d\.\d{4}, \d+ img/s\]", err), err[-2000:]
    for epoch in (1, 2):
        line = re.search(rf"epoch {epoch}/2  train loss (\S+) acc (\S+) \| test loss (\S+) acc (\S+) "
                         rf"\(200 images\) \| (\d+) img/s \| (\S+) s \| MFU (\S+)%", err)
        assert line, f"no epoch {epoch} line in:\n{err[-2000:]}"
        assert all(math.isfinite(float(v)) for v in line.groups())
    m = metrics(out)
    assert m["epochs"] == 2 and m["steps"] == 2 * STEPS_PER_EPOCH and m["world_size"] == 1
    assert set(m) >= {"test_acc", "test_loss", "train_loss", "train_acc", "img_per_s", "epochs", "world_size",
                      "mlflow_run_id", "wall_s"}
    assert (out / "config.yaml").is_file()


def test_progress_false_prints_no_bar(tmp_path, capsys):
    assert train_in_process(overrides(tmp_path / "run", **TINY, train__max_steps=2)) == 0
    assert "step/s" not in capsys.readouterr().err


def test_progress_into_a_file_is_plain_lines_every_log_every_steps(tmp_path, capsys):
    """The default (auto) with stderr captured, as `nin-train > log 2>&1` or a batch system has it:
    no carriage-return frames, one line at step 1 and every train.log_every steps, counting to
    train.max_steps where the epochs would go further; the time left is `?` until a step after the
    first is done (the first compiles and warms up), then as tqdm writes intervals."""
    argv = overrides(tmp_path / "run", **TINY, train__progress="auto", train__log_every=5, train__max_steps=12)
    assert train_in_process(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "step/s" not in err
    lines = re.findall(r"step (\d+)/12 \(\d+%\)  loss \d\.\d{4}  \d+ img/s  (\?|\d\d:\d\d) left", err)
    assert [(int(step), left == "?") for step, left in lines] == [(1, True), (5, False), (10, False)], err[-2000:]


def test_resume_after_an_epoch_and_mid_epoch_is_bit_identical(tmp_path, capsys):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert train_in_process(overrides(whole, **TINY)) == 0
    # Stopped at the end of epoch 1, then 3 steps into epoch 2, then run to the end.
    assert train_in_process(overrides(pieces, **TINY, train__max_steps=STEPS_PER_EPOCH)) == 0
    first = last_checkpoint(pieces)
    assert (first[ckpt.EPOCH], first[ckpt.EPOCH_STEP], first[ckpt.STEP]) == (1, 0, STEPS_PER_EPOCH)
    assert train_in_process(overrides(pieces, **TINY, train__max_steps=STEPS_PER_EPOCH + 3)) == 0
    middle = last_checkpoint(pieces)
    assert (middle[ckpt.EPOCH], middle[ckpt.EPOCH_STEP], middle[ckpt.STEP]) == (1, 3, STEPS_PER_EPOCH + 3)
    assert train_in_process(overrides(pieces, **TINY)) == 0
    assert "resuming from" in capsys.readouterr().err

    a, b = last_checkpoint(whole), last_checkpoint(pieces)
    assert_bit_identical(a[ckpt.MODEL], b[ckpt.MODEL])  # parameters and BatchNorm buffers
    for sa, sb in zip(a[ckpt.OPTIMIZER]["state"].values(), b[ckpt.OPTIMIZER]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert metrics(whole)["test_acc"] == metrics(pieces)["test_acc"]
    # metrics.json's history spans the restarts: every evaluation, the partial epoch's included.
    evaluations = {(h["epoch"], h["step"]): h["test_acc"] for h in metrics(pieces)["history"]}
    assert list(evaluations) == [(1, STEPS_PER_EPOCH), (2, STEPS_PER_EPOCH + 3), (2, 2 * STEPS_PER_EPOCH)]
    assert {(h["epoch"], h["step"]): h["test_acc"] for h in metrics(whole)["history"]} == {
        k: v for k, v in evaluations.items() if k != (2, STEPS_PER_EPOCH + 3)}
    # A checkpoint describes itself, and its "model" is the plain state_dict of NiN.
    assert set(b) >= {ckpt.MODEL, ckpt.OPTIMIZER, ckpt.SCHEDULER, ckpt.SCALER, ckpt.RNG, ckpt.EPOCH, ckpt.STEP,
                      ckpt.CONFIG_HASH, ckpt.MLFLOW_RUN_ID}
    from nin_dist.config import load_config

    NiN(load_config(overrides(pieces)[1]).model).load_state_dict(b[ckpt.MODEL])


def _all_finite(state: dict) -> bool:
    return all(t.isfinite().all() for t in state.values() if t.is_floating_point())


def test_divergence_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(overrides(out, **TINY, train__max_steps=STEPS_PER_EPOCH)) == 0
    good = last_checkpoint(out)
    capsys.readouterr()

    # Epoch 2 with lr=1e6 (the checkpoint's optimizer takes the new lr): the loss goes NaN/inf.
    rc = train_in_process(overrides(out, **TINY, optim__lr=1e6, run__allow_config_change=True, train__log_every=1))
    assert rc == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nin-train: error:")]
    assert len(err_lines) == 1 and "NaN/inf" in err_lines[0] and "last good checkpoint" in err_lines[0], err_lines
    kept = last_checkpoint(out)
    assert kept[ckpt.STEP] == STEPS_PER_EPOCH and _all_finite(kept[ckpt.MODEL])
    assert_bit_identical(kept[ckpt.MODEL], good[ckpt.MODEL])


def test_a_diverged_model_is_never_saved(tmp_path, capsys):
    # A checkpoint every step and no loss check after step 1: only the guard before `save` stands
    # between the NaN/inf parameters and last.pt.
    out = tmp_path / "run"
    rc = train_in_process(overrides(out, **TINY, optim__lr=1e6, train__checkpoint_every=1, train__log_every=1000))
    assert rc == 2
    err = capsys.readouterr().err
    assert "parameters or optimizer state hold NaN/inf" in err and "not saved" in err
    kept = last_checkpoint(out)
    assert kept[ckpt.STEP] >= 1 and _all_finite(kept[ckpt.MODEL])
    assert all(t.isfinite().all() for s in kept[ckpt.OPTIMIZER]["state"].values() for t in s.values())


def test_a_checkpoint_of_another_config_is_refused_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(overrides(out, **TINY, train__max_steps=STEPS_PER_EPOCH)) == 0
    capsys.readouterr()
    assert train_in_process(overrides(out, **TINY, optim__lr=0.07)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nin-train: error: ") and "different config (changed: optim.lr)" in err[-1]
    assert "run.allow_config_change=true" in err[-1]
    assert last_checkpoint(out)[ckpt.STEP] == STEPS_PER_EPOCH  # untouched

    assert train_in_process(overrides(out, **TINY, optim__lr=0.07, run__allow_config_change=True)) == 0
    assert "resuming from" in capsys.readouterr().err
    state = last_checkpoint(out)
    assert state[ckpt.STEP] == 2 * STEPS_PER_EPOCH
    assert {g["initial_lr"] for g in state[ckpt.OPTIMIZER]["param_groups"]} == {0.07}  # the new config's lr


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    steps = {"train__max_steps": STEPS_PER_EPOCH, "train__epochs": 1}
    assert train_in_process(overrides(tmp_path / "fp32", **{**TINY, **steps})) == 0
    assert train_in_process(overrides(tmp_path / "bf16", **{**TINY, **steps}, train__precision="bf16",
                                      train__channels_last=True)) == 0
    fp32, bf16 = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    assert math.isfinite(bf16["train_loss"]) and math.isfinite(bf16["test_loss"])
    # Same data and init; bf16 rounds activations to 8 bits of mantissa (~0.4%).
    assert abs(bf16["train_loss"] - fp32["train_loss"]) < 0.05, (bf16, fp32)
    state = last_checkpoint(tmp_path / "bf16")[ckpt.MODEL]
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())  # fp32 master weights


@pytest.mark.slow
def test_compile_on_cpu(tmp_path):
    started = time.perf_counter()
    out = tmp_path / "run"
    argv = overrides(out, **{**TINY, "train__epochs": 1}, train__compile=True, train__max_steps=2)
    assert train_in_process(argv) == 0
    assert math.isfinite(metrics(out)["train_loss"])
    assert "_orig_mod" not in "".join(last_checkpoint(out)[ckpt.MODEL])  # the unwrapped module is saved
    print(f"train.compile=true, 2 steps on CPU: {time.perf_counter() - started:.1f} s")


@pytest.mark.parametrize("args, message", [
    (["train.epochs=0"], "nin-train: error: train.epochs=0 is not allowed: at least 1"),
    (["train.epoch=2"], "nin-train: error: unknown config key train.epoch; did you mean train.epochs?"),
    (["data.root=/nonexistent", "data.download=false"],
     "nin-train: error: data.root=/nonexistent: Fashion-MNIST not found there"),
    (["train.batch_size=100000"], "nin-train: error: train.batch_size=100000 is larger than the 128 training"),
    (["train.precision=fp16"], "nin-train: error: train.precision=fp16 needs CUDA"),
    (["data.val_size=128"], "nin-train: error: data.val_size=128 is not allowed: 0 to 127 images (fewer than the "
                            "128 of data.train_limit=128)"),
    (["data.val_size=-1"], "nin-train: error: data.val_size=-1 is not allowed: 0 to 127 images"),
    (["data.val_size=120", "train.batch_size=16"],
     "nin-train: error: train.batch_size=16 is larger than the 8 training images (data.train_limit=128 less "
     "data.val_size=120)"),
    (["train.ema_decay=1"], "nin-train: error: train.ema_decay=1.0 is not allowed: in [0, 1) (0 = off)"),
    (["train.ema_decay=-0.1"], "nin-train: error: train.ema_decay=-0.1 is not allowed: in [0, 1)"),
    (["data.erase=1.5"], "nin-train: error: data.erase=1.5 is not allowed: a probability in [0, 1]"),
    (["data.translate=15"], "nin-train: error: data.translate=15 is not allowed: 0 to 14 pixels"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    argv = overrides(tmp_path / "run", data__train_limit=128) + args
    assert train_in_process(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nin-train")]
    assert len(err) == 1 and err[0].startswith(message), err


def test_batch_size_must_split_over_ranks():
    from nin_dist.config import load_config
    from nin_dist.distributed import DistInfo
    from nin_dist.errors import ConfigError
    from nin_dist.train import check_world

    three = DistInfo(rank=0, local_rank=0, world_size=3, local_world_size=3, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match=r"train.batch_size=128 must be divisible by the world size 3"):
        check_world(load_config(None, ["train.batch_size=128"]), three)
    check_world(load_config(None, ["train.batch_size=129"]), three)


def test_a_missing_config_file_exits_2(capsys):
    assert train_in_process(["--config", "no/such.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "nin-train: error: --config no/such.yaml: no such file"


def test_other_failures_exit_1_with_a_traceback(tmp_path):
    # A launcher that sets RANK to something that is not a number: not the user's config, data or
    # arguments, so the real traceback is shown.
    rc, out = run([sys.executable, "-m", "nin_dist.train", *overrides(tmp_path / "run", **TINY, train__max_steps=1)],
                  env=env(RANK="zero", WORLD_SIZE="1"), timeout=120)
    assert rc == 1, out
    assert "Traceback (most recent call last)" in out and "nin-train: error" not in out


# --------------------------------------------------------------------------- GPU (skipped without CUDA)

@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_channels_last_compile_follow_fp32(tmp_path):
    data_dir()
    cuda = {"data__train_limit": 2560, "data__test_limit": 1000, "train__batch_size": 128, "train__epochs": 2,
            "train__device": "cuda", "model__kernel": "auto", "train__threads": 1}
    assert train_in_process(overrides(tmp_path / "fp32", **cuda)) == 0
    assert train_in_process(overrides(tmp_path / "fast", **cuda, train__precision="bf16",
                                      train__channels_last=True, train__compile=True)) == 0
    fp32, fast = metrics(tmp_path / "fp32"), metrics(tmp_path / "fast")
    assert fast["train_loss"] < math.log(10) - 0.1  # it learns
    assert abs(fast["train_loss"] - fp32["train_loss"]) < 0.1 and abs(fast["test_acc"] - fp32["test_acc"]) < 0.1
    diff, where = max_rel_diff(last_checkpoint(tmp_path / "fast")[ckpt.MODEL],
                               last_checkpoint(tmp_path / "fp32")[ckpt.MODEL])
    print(f"bf16+channels_last+compile vs fp32 after 40 steps: max rel param diff {diff:.2e} ({where})")
