"""The run folder: one job at a time (a real second job on a held folder), unique generated names,
`run.name` as one folder name, `run.out_dir` that cannot be written, and no password on disk.

Holders of a folder are real processes: `nin-train` itself, or `helpers.holding` (a process that
takes the lock through `RunDir.open` the way rank 0 does and waits to be told to go).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from helpers import assert_bit_identical, finish, holding, last_checkpoint, overrides, run, start, train_in_process

from nin_dist.distributed import DistInfo
from nin_dist.errors import RunDirError
from nin_dist.run_dir import LOCK_FILE, RunDir, default_name, open_run_dir

WORLD_OF_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                        backend=None)
TINY = {"data__train_limit": 128, "data__test_limit": 200, "train__batch_size": 16, "train__epochs": 1,
        "train__max_steps": 2}

def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "nin-train: error:" in line]


def test_a_second_job_on_a_running_jobs_folder_exits_2_and_the_first_is_unaffected(tmp_path):
    out, lone = tmp_path / "shared", tmp_path / "lone"
    first = start([sys.executable, "-m", "nin_dist.train", *overrides(out, **TINY)])
    lock, deadline = out / LOCK_FILE, time.monotonic() + 120
    while not (lock.exists() and f'"pid": {first.pid},' in lock.read_text()):  # the first job holds it
        assert first.poll() is None, finish(first, 5)[1][-3000:]
        assert time.monotonic() < deadline, "the first job never locked its folder"
        time.sleep(0.05)
    # Paused while the second job tries, so it is still running however fast this machine trains.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        rc, text = run([sys.executable, "-m", "nin_dist.train", *overrides(out, **TINY)], timeout=120)
        seconds = time.monotonic() - started
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert rc == 2, text[-3000:]
    assert error_lines(text) == [f"nin-train: error: run.out_dir={out} is in use by another job (pid {first.pid} "
                                 f"on host {socket.gethostname()}); wait for it to end, or choose another "
                                 f"run.out_dir or run.name"], text[-3000:]
    assert "Traceback" not in text and seconds < 60, seconds
    print(f"second job refused in {seconds:.1f} s (interpreter start-up included)")

    rc, text = finish(first, timeout=300)
    assert rc == 0, text[-3000:]
    assert train_in_process(overrides(lone, **TINY)) == 0
    shared_m, lone_m = (json.loads((d / "metrics.json").read_text()) for d in (out, lone))
    for key in ("test_acc", "test_loss", "train_loss", "train_acc", "steps"):
        assert shared_m[key] == lone_m[key], key
    assert_bit_identical(last_checkpoint(out)["model"], last_checkpoint(lone)["model"])


def test_the_folder_is_free_again_once_its_holder_ends(tmp_path):
    with holding(tmp_path / "run"):
        with pytest.raises(RunDirError, match=r"in use by another job \(pid \d+ on host "):
            RunDir(tmp_path / "run").open()
    # The holder is gone (the OS dropped its lock): the folder is taken, and released again on close.
    with open_run_dir(tmp_path / "run", WORLD_OF_ONE) as run_dir:
        held = json.loads((run_dir.path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with open_run_dir(tmp_path / "run", WORLD_OF_ONE):
        pass


def test_a_restarted_rank_0_waits_for_the_same_jobs_old_one_and_no_other(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    with holding(folder, TORCHELASTIC_RUN_ID="job-a") as old:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another job: refused at once
        started = time.monotonic()
        with pytest.raises(RunDirError, match=f"pid {old.pid} "):
            RunDir(folder).open(wait_s=120)
        assert time.monotonic() - started < 60  # not the 120 s wait; loose, for a loaded machine

        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")  # the same job: waits, bounded
        started = time.monotonic()
        with pytest.raises(RunDirError, match=f"pid {old.pid} "):
            RunDir(folder).open(wait_s=1.0)
        assert 1.0 <= time.monotonic() - started < 60  # waited, and gave up (loose: a loaded machine)
        old.stdin.close()  # the old rank 0 ends while the new one waits
        run_dir = RunDir(folder)
        run_dir.open(wait_s=20)
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    run_dir.close()


def test_generated_names_are_unique():
    assert default_name("experiment-a1") != default_name("experiment-a2")
    assert default_name("experiment-a1") == default_name("experiment-a1") == "nin-experiment-a1"  # restarts
    assert default_name("a/b") != default_name("a_b") and "/" not in default_name("a/../b")
    assert len(default_name("x" * 10_000)) < 200
    plain = {default_name(None) for _ in range(1000)} | {default_name("none") for _ in range(1000)}
    assert len(plain) == 2000 and all(name.startswith("nin-20") for name in plain)


@pytest.mark.parametrize("name", ["/etc", "../x", "", "a/b", "a\0b", ".", "..", "new\nline", "x" * 201])
def test_run_name_must_be_one_folder_name(tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/<name> would land here
    argv = overrides(tmp_path / "unused", **TINY)
    argv.remove(f"run.out_dir={tmp_path / 'unused'}")
    assert train_in_process([*argv, f"run.name={name}"]) == 2
    err = error_lines(capsys.readouterr().err)
    # (NUL is refused by the config loader for every text value, the rest by the run folder's check)
    assert len(err) == 1 and err[0].startswith("nin-train: error: run.name=") and "is not allowed" in err[0], err
    assert list(tmp_path.iterdir()) == [], "something was made before the name was refused"


def test_out_dir_under_a_file_is_one_line_before_any_loading(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    # data.root does not exist: had the data been looked for first, that would be the error.
    argv = overrides(blocker / "run", **TINY, data__root=tmp_path / "no-data", data__download=False)
    assert train_in_process(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [f"nin-train: error: run.out_dir={blocker / 'run'} cannot be written (Not a directory: "
                   f"{blocker / 'run'}); choose another run.out_dir"], err


@contextmanager
def read_only_folder(tmp_path):
    """A read-only folder: a read-only tmpfs as root (who may write anywhere else), else mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"root without permission to mount a read-only tmpfs: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("inside", [False, True], ids=["folder", "below"])
def test_a_read_only_out_dir_is_one_line_before_any_loading(tmp_path, capsys, inside):
    with read_only_folder(tmp_path) as folder:
        out = folder / "run" if inside else folder
        assert train_in_process(overrides(out, **TINY, data__root=tmp_path / "no-data", data__download=False)) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"nin-train: error: run.out_dir={out} cannot be written ("), err
    assert "Read-only file system" in err[0] or "Permission denied" in err[0], err


def test_a_tracking_password_never_reaches_config_yaml(tmp_path):
    out = tmp_path / "run"
    uri = "http://alice:pa55-w0rd-42@127.0.0.1:9/"
    assert train_in_process(overrides(out, **TINY, tracking__uri=uri)) == 0
    text = (out / "config.yaml").read_text()
    assert "pa55-w0rd-42" not in text and "http://alice:***@127.0.0.1:9/" in text, text
    assert not [p for p in out.rglob("*") if p.is_file() and b"pa55-w0rd-42" in p.read_bytes()]
