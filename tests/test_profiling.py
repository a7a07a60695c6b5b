"""The profile window in this process: its keys, its off state, and a profiled run of one process. The
2-process job with its MLflow artifacts is tests/tracking/test_trainer_runs.py's torchrun job."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import CPU_CONFIG, assert_bit_identical, last_checkpoint, overrides, train_in_process

from nin_dist import checkpoint as ckpt
from nin_dist import profiling
from nin_dist.bench import trace
from nin_dist.config import TrainConfig, load_config
from nin_dist.distributed import DistInfo
from nin_dist.perf import train_flops_per_image
from nin_dist.tracking import NullTracker
from nin_dist.train import main

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)
BATCHES = SimpleNamespace(steps_per_epoch=10)  # what a window reads of the run's TrainBatches


@pytest.mark.parametrize("override, allowed", [
    ("train.profile_steps=-1", "0 (off) or a step count up to 100"),
    ("train.profile_steps=101", "0 (off) or a step count up to 100"),
    ("train.profile_start=0", "a global step from 1"),
    ("train.profile_memory=true", "false with train.device=cpu"),
])
def test_a_bad_profile_value_is_one_line_and_exit_2(override, allowed, capsys):
    assert main(["--config", "configs/cpu.yaml", "train.device=cpu", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0] and allowed in lines[0], lines


def test_off_makes_no_profiler_and_no_regions(tmp_path):
    window = profiling.make_window(TrainConfig(epochs=1), INFO, tmp_path, 0, BATCHES, NullTracker())
    assert isinstance(window, profiling.NullWindow)
    assert profiling.region("block1") is profiling.region("loss")  # the one shared no-op context
    window.at(1)
    assert not (tmp_path / profiling.FOLDER).exists()


def test_a_window_behind_the_run_or_beyond_it_is_off(tmp_path):
    window = TrainConfig(epochs=1, profile_start=2, profile_steps=3)
    assert isinstance(profiling.make_window(window, INFO, tmp_path, 0, BATCHES, NullTracker()),
                      profiling.ProfileWindow)  # ahead: starts before step 2
    assert isinstance(profiling.make_window(window, INFO, tmp_path, 4, BATCHES, NullTracker()),
                      profiling.NullWindow)  # resumed past it
    beyond = TrainConfig(epochs=1, profile_start=11, profile_steps=3)  # 10 steps in the run
    assert isinstance(profiling.make_window(beyond, INFO, tmp_path, 0, BATCHES, NullTracker()), profiling.NullWindow)
    profiling.enable_regions(False)


# Two steps an epoch (32 images, global batch 16). The window, steps 2-3, spans the first epoch's end,
# so its evaluation; the run stops at step 4 and a resume takes it to 5.
RUN = {"data__train_limit": 32, "data__test_limit": 50, "train__batch_size": 16, "train__epochs": 3,
       "train__max_steps": 4, "model__width": 0.125, "model__dropout": 0.1}
WINDOW = {"train__profile_start": 2, "train__profile_steps": 2}
REGIONS = {f"block{b}{part}" for b in (1, 2, 3, 4) for part in ("", "/batchnorm", "/pair1x1")} | {
    "block1/conv5x5", "block2/conv5x5", "block3/conv3x3", "block4/conv3x3", "pool1", "pool2", "pool3", "avgpool",
    "forward", "loss", "backward", "optimizer.step", "evaluation", "ProfilerStep#2", "ProfilerStep#3"}


@pytest.mark.slow
def test_a_profiled_run_trains_the_unprofiled_weights_and_a_resume_past_it_traces_nothing(tmp_path):
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    assert train_in_process(overrides(plain, **RUN)) == 0
    assert train_in_process(overrides(profiled, **RUN, **WINDOW)) == 0
    assert_bit_identical(last_checkpoint(profiled)[ckpt.MODEL], last_checkpoint(plain)[ckpt.MODEL])
    assert not (plain / profiling.FOLDER).exists()

    folder = profiled / profiling.FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["rank0-steps2-3.trace.json.gz", "summary.txt"]
    names = {e["name"] for e in trace.load(folder / "rank0-steps2-3.trace.json.gz")}  # gzipped Chrome JSON
    assert REGIONS <= names, sorted(REGIONS - names)
    # The FLOPs nin-bench profile reads from the recorded shapes: those of nin_dist.shapes for the batch
    # (which counts the first conv's input grad too: its share here is ~1%).
    step = trace.analyze(folder / "rank0-steps2-3.trace.json.gz")
    counted = sum(part["gflop"] for part in step["parts"].values()) * 1e9
    cfg = load_config(CPU_CONFIG, [f"{k.replace('__', '.')}={v}" for k, v in RUN.items()])
    assert counted == pytest.approx(train_flops_per_image(cfg) * cfg.train.batch_size, rel=0.03)
    summary = (folder / "summary.txt").read_text()
    assert "global steps 2-3 on rank 0 of 1" in summary and "aten::conv2d" in summary

    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert train_in_process(overrides(profiled, **{**RUN, **WINDOW, "train__max_steps": 5})) == 0
    assert last_checkpoint(profiled)[ckpt.STEP] == 5  # resumed at step 4, past the window
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
