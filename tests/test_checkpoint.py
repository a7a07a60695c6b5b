"""Checkpoints: atomic writes that survive a SIGKILL, weights_only loads, refusing another config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nin_dist import checkpoint as ckpt
from nin_dist.distributed import DistInfo
from nin_dist.errors import CheckpointError

WORLD_OF_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                        backend=None)

# A child that writes a 256 MiB checkpoint through atomic_save; the test kills it mid-write.
WRITER = """
import sys
from pathlib import Path
import torch
from nin_dist.checkpoint import atomic_save
atomic_save({"model": {"w": torch.full((64 * 2**20,), 2.0)}, "step": 2}, Path(sys.argv[1]))
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    tmp = path.with_name("last.pt.tmp")
    previous = {"model": {"w": torch.arange(10.0)}, "step": 1}
    ckpt.atomic_save(previous, path)

    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 2**20):  # the new bytes are arriving
        assert child.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL

    assert tmp.exists(), "killed after the rename: the test did not interrupt a write"
    assert tmp.stat().st_size < 64 * 2**22, "the partial file should be short of the full 256 MiB"
    loaded = ckpt.load(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], previous["model"]["w"])

    # The next save goes over the stale temp file.
    ckpt.atomic_save({"model": {"w": torch.ones(3)}, "step": 3}, path)
    assert ckpt.load(path)["step"] == 3 and not tmp.exists()


class NotATensor:
    pass


def test_load_is_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "payload": NotATensor()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        ckpt.load(path)


def _state(config: dict, digest: str) -> dict:
    return {ckpt.MODEL: {"w": torch.zeros(2)}, ckpt.CONFIG: config, ckpt.CONFIG_HASH: digest}


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, WORLD_OF_ONE)
    assert checkpointer.load_for_resume("aaaa", {"optim.lr": 0.1}, allow_change=False) is None  # nothing yet
    checkpointer.save(_state({"optim.lr": 0.1, "model.width": 1.0}, "aaaa"))

    same = checkpointer.load_for_resume("aaaa", {"optim.lr": 0.1, "model.width": 1.0}, allow_change=False)
    assert same[ckpt.CONFIG_HASH] == "aaaa"
    with pytest.raises(CheckpointError, match=r"different config \(changed: model.width, optim.lr\).*"
                                              r"run.allow_config_change=true"):
        checkpointer.load_for_resume("bbbb", {"optim.lr": 0.2, "model.width": 0.5}, allow_change=False)
    assert checkpointer.load_for_resume("bbbb", {"optim.lr": 0.2}, allow_change=True) is not None


def test_an_unreadable_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded.*run.resume=false"):
        ckpt.Checkpointer(tmp_path, WORLD_OF_ONE).load_for_resume("aaaa", {}, allow_change=False)


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(3)
    state = ckpt.rng_state()
    expected = torch.rand(4)
    ckpt.atomic_save({ckpt.RNG: state}, tmp_path / "rng.pt")
    torch.manual_seed(99)
    ckpt.set_rng_state(ckpt.load(tmp_path / "rng.pt")[ckpt.RNG])
    assert torch.equal(torch.rand(4), expected)


def test_a_checkpoint_path_is_only_ever_renamed_into(tmp_path):
    # The directory entry for last.pt is replaced atomically; no partially written last.pt is ever visible.
    path = Path(tmp_path) / "last.pt"
    ckpt.atomic_save({"a": torch.ones(1)}, path)
    inode = path.stat().st_ino
    ckpt.atomic_save({"a": torch.zeros(1)}, path)
    assert path.stat().st_ino != inode  # a new file took the name; the old one was never rewritten in place
