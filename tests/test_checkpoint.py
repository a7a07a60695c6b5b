"""Checkpoints: atomic writes that survive a SIGKILL or a full disk, weights_only loads, refusing
another config or a file that is not a checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import last_checkpoint, overrides, train_in_process

from nin_dist import checkpoint as ckpt
from nin_dist.distributed import DistInfo
from nin_dist.errors import CheckpointError

WORLD_OF_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                        backend=None)
# 128 training images in global batches of 16, 8 steps per epoch.
TINY = {"data__train_limit": 128, "data__test_limit": 200, "train__batch_size": 16, "train__epochs": 2}
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
    previous = {"model": {"w": torch.arange(10.0)}, "step": 1}
    ckpt.atomic_save(previous, path)

    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    deadline = time.monotonic() + 60
    while not (ckpt.temp_files(path) and ckpt.temp_files(path)[0].stat().st_size > 2**20):  # bytes arriving
        assert child.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL

    (tmp,) = ckpt.temp_files(path)
    assert tmp.name.startswith(f"last.pt.{child.pid}-"), "the temp file is named after its writer"
    assert tmp.stat().st_size < 64 * 2**22, "the partial file should be short of the full 256 MiB"
    loaded = ckpt.load(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], previous["model"]["w"])

    # The next job's checkpointer (it holds the run folder) removes what the killed writer left.
    checkpointer = ckpt.Checkpointer(tmp_path, WORLD_OF_ONE)
    assert ckpt.temp_files(path) == []
    checkpointer.save({"model": {"w": torch.ones(3)}, "step": 3})
    assert ckpt.load(path)["step"] == 3 and ckpt.temp_files(path) == []


def test_two_writers_never_share_a_temp_file(tmp_path):
    # Each writer's temp name is its own: start two saves in two processes at once, both land whole.
    path = tmp_path / "checkpoints" / "last.pt"
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(path)]) for _ in range(2)]
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    assert ckpt.load(path)["step"] == 2 and ckpt.temp_files(path) == []


class NotATensor:
    pass


def test_load_is_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "payload": NotATensor()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        ckpt.load(path)


def _state(config: dict, digest: str, step: int = 5) -> dict:
    return {ckpt.MODEL: {"w": torch.zeros(2)}, ckpt.OPTIMIZER: {}, ckpt.SCALER: {}, ckpt.RNG: ckpt.rng_state(),
            ckpt.EPOCH: 0, ckpt.EPOCH_STEP: step, ckpt.STEP: step, ckpt.CONFIG: config, ckpt.CONFIG_HASH: digest}


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


def test_a_start_of_another_config_is_no_state_to_resume(tmp_path):
    """The checkpoint saved before step 1 holds nothing trained: another config starts afresh (None)."""
    checkpointer = ckpt.Checkpointer(tmp_path, WORLD_OF_ONE)
    checkpointer.save(_state({"optim.lr": 1e30}, "aaaa", step=0))
    assert checkpointer.load_for_resume("aaaa", {"optim.lr": 1e30}, allow_change=False)[ckpt.STEP] == 0
    for allow_change in (False, True):
        assert checkpointer.load_for_resume("bbbb", {"optim.lr": 0.1}, allow_change=allow_change) is None


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



def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("nin-train")]


def _not_a_list(state):
    return [state[ckpt.MODEL]]


def _without(*keys):
    return lambda state: {k: v for k, v in state.items() if k not in keys}


def _with(**values):
    return lambda state: {**state, **{getattr(ckpt, k): v for k, v in values.items()}}


@pytest.mark.parametrize("tamper, message", [
    (_not_a_list, r"not a nin-train checkpoint \(a list, not a dict\)"),
    (_without(ckpt.OPTIMIZER, ckpt.STEP), r"not a nin-train checkpoint \(missing: optimizer, step\)"),
    (_with(EPOCH="1", MODEL=[1, 2]), r"not a nin-train checkpoint \(wrong type: model, epoch\)"),
    (_with(MODEL={"0.0.weight": "weights"}), r"not a nin-train checkpoint \(wrong type: model values\)"),
    (_with(RNG={"torch": torch.zeros(3), "python": [1]}), r"does not fit this model"),
], ids=["list", "missing-keys", "wrong-types", "model-not-tensors", "bad-rng"])
def test_a_checkpoint_that_is_not_ours_is_one_line(tmp_path, capsys, tamper, message):
    out = tmp_path / "run"
    assert train_in_process(overrides(out, **TINY, train__max_steps=1)) == 0
    path = out / "checkpoints" / "last.pt"
    torch.save(tamper(last_checkpoint(out)), path)
    capsys.readouterr()
    assert train_in_process(overrides(out, **TINY, train__max_steps=2)) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and re.match(rf"nin-train: error: {re.escape(str(path))}:? {message}", err[0]), err
    assert "run.resume=false" in err[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 16 MiB tmpfs (tests run as root in CI); skipped where mounting is not permitted."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mount.stderr.strip() or mount.returncode}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path, leave: int) -> None:
    """Take all of `folder`'s filesystem but `leave` bytes."""
    vfs = os.statvfs(folder)
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, vfs.f_bavail * vfs.f_frsize - leave))


def test_disk_full_during_a_save_is_one_line_and_keeps_the_old_checkpoint(small_tmpfs, capsys):
    out = small_tmpfs / "run"
    assert train_in_process(overrides(out, **TINY, train__max_steps=1)) == 0
    path = out / "checkpoints" / "last.pt"
    before = path.read_bytes()
    assert len(before) > 256 * 1024  # a checkpoint cannot fit in what is left below
    _fill(small_tmpfs, leave=64 * 1024)  # room for config.yaml, not for a checkpoint
    capsys.readouterr()

    assert train_in_process(overrides(out, **TINY, train__max_steps=2)) == 2
    err = _error_lines(capsys)
    assert err == [f"nin-train: error: {path}: checkpoint not saved (No space left on device); the previous "
                   f"checkpoint is kept; free some space or choose another run.out_dir"], err
    assert path.read_bytes() == before
    assert ckpt.temp_files(path) == [] and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_atomic_save_on_a_full_disk_raises_a_user_error(small_tmpfs):
    path = small_tmpfs / "last.pt"
    ckpt.atomic_save({"w": torch.zeros(1000)}, path)
    with pytest.raises(CheckpointError, match="checkpoint not saved .No space left on device.; the previous "
                                              "checkpoint is kept"):
        ckpt.atomic_save({"w": torch.zeros(8 * 2**20)}, path)  # 32 MiB into 16
    assert torch.equal(ckpt.load(path)["w"], torch.zeros(1000)) and ckpt.temp_files(path) == []
