"""Shared test helpers: tiny real-data runs of the trainer, in this process or under torchrun.

Every run here trains on the real Fashion-MNIST cut down with `data.train_limit` / `data.test_limit`
and `train.max_steps`, with tracking off and one intra-op thread per process (two cores shared by
everything). Subprocesses get a free port, a timeout, and their own process group so a hung torchrun
takes its workers with it.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from nin_dist import checkpoint
from nin_dist.config import DataConfig
from nin_dist.data import find_root, locate, read_idx
from nin_dist.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "configs" / "cpu.yaml"
_DATA: list[Path | str] = []  # the root, or why there is none: found once per process


def data_dir() -> Path:
    """The real Fashion-MNIST, found as `nin-train` finds it (nin_dist.data.find_root): $NIN_DATA_DIR,
    the checkout's ./data, Debian's /usr/share/datasets/fashion-mnist, in torchvision's layout or the
    four files directly; with none of them, downloaded into ./data as a first `make train` does.

    Found once per process: a test that moves the search (its own $NIN_DATA_DIR, working folder or
    system location) does not move the suite's data, and with no data and no network the download is
    tried once, not by every test."""
    if not _DATA:
        here = Path.cwd()
        os.chdir(REPO)  # ./data is the checkout's, where `make train` puts it, wherever pytest started
        try:
            _DATA.append((REPO / find_root(DataConfig())).resolve())
        except DataError as err:
            _DATA.append(f"the tests need the real Fashion-MNIST (NIN_DATA_DIR=DIR names a copy): {err}")
        finally:
            os.chdir(here)
    if isinstance(_DATA[0], str):
        pytest.fail(_DATA[0], pytrace=False)
    return _DATA[0]


def real_gz(idx) -> bytes:
    """The gzip bytes of one real file (a nin_dist.data.FILES entry), whether the root holds it
    compressed or not."""
    path = locate(data_dir(), idx)
    return path.read_bytes() if path.suffix == ".gz" else gzip.compress(read_idx(path, idx))


def env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess run: the data, unbuffered output, no inherited torchrun vars."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID")}
    out.update(NIN_DATA_DIR=str(data_dir()), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(out_dir: Path, **values) -> list[str]:
    """`key=value` arguments for a tiny CPU run into `out_dir`; keyword `a__b=v` means `a.b=v`."""
    base = {"tracking.enabled": "false", "train.progress": "false", "train.threads": "1",
            "train.device": "cpu", "run.out_dir": str(out_dir)}
    base.update({k.replace("__", "."): str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()})
    return ["--config", str(CPU_CONFIG), *(f"{k}={v}" for k, v in base.items())]


def train_in_process(args: list[str]) -> int:
    """`nin-train ARGS` in this process (no interpreter start-up); returns the exit code."""
    from nin_dist.train import main

    old = os.environ.get("NIN_DATA_DIR")
    os.environ["NIN_DATA_DIR"] = str(data_dir())
    try:
        return main(args)
    finally:
        if old is None:
            os.environ.pop("NIN_DATA_DIR", None)
        else:
            os.environ["NIN_DATA_DIR"] = old


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=kwargs.pop("cwd", REPO), env=kwargs.pop("env", None) or env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for `proc`; on timeout kill its whole process group and fail with what it printed."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} timed out after {timeout} s; output:\n{out[-4000:]}")
    return proc.returncode, out


def run(cmd: list[str], timeout: float = 120, **kwargs) -> tuple[int, str]:
    return finish(start(cmd, **kwargs), timeout)


def torchrun_cmd(launcher_args: list[str], train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "nin_dist.train", *train_args]


def standalone(nproc: int, train_args: list[str], timeout: float = 180, extra: list[str] = ()) -> tuple[int, str]:
    """`torchrun --standalone --nproc_per_node=N -m nin_dist.train ARGS` (it picks a free port itself)."""
    return run(torchrun_cmd(["--standalone", f"--nproc_per_node={nproc}", *extra], train_args), timeout)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (e.g. torchrun's workers)."""
    return [child.pid for child in psutil.Process(pid).children()]


def env_int(pid: int, name: str) -> int | None:
    """The integer environment variable `name` (e.g. RANK) a running process was started with, or None."""
    try:
        value = psutil.Process(pid).environ().get(name)
    except psutil.Error:  # ended while we looked, or a zombie
        return None
    return None if value is None else int(value)


def local_rank(pid: int) -> int | None:
    """The LOCAL_RANK a running worker was started with, or None."""
    return env_int(pid, "LOCAL_RANK")


def newest_checkpoint(out_dir: Path, at_least: int, timeout: float = 240,
                      check: Callable[[], object] = lambda: None) -> int:
    """The step of `out_dir`'s checkpoint once it is `at_least`, read each time the file is replaced
    (every save is a new file: its inode changes). `check()` runs between looks: it asserts that the
    jobs that save still run."""
    path, seen, deadline = Path(out_dir) / "checkpoints" / "last.pt", None, time.monotonic() + timeout
    while True:
        inode = path.stat().st_ino if path.exists() else None
        if inode is not None and inode != seen:
            seen, step = inode, checkpoint.load(path)[checkpoint.STEP]
            if step >= at_least:
                return step
        check()
        assert time.monotonic() < deadline, f"no checkpoint of step {at_least} or later in {timeout} s"
        time.sleep(0.02)


def kill_rank_after_checkpoint(jobs: subprocess.Popen | list[subprocess.Popen], out_dir: Path, step: int,
                               settle: float, rank: int = 1) -> Path:
    """Wait for the checkpoint of `step` of the job that `jobs` run (one torchrun, or one
    launch/multinode.sh per node), let it train `settle` seconds past it, then SIGKILL its worker of
    global RANK `rank` while nothing newer is saved; returns the checkpoint's path."""
    jobs = jobs if isinstance(jobs, list) else [jobs]

    def running() -> None:
        for job in jobs:
            assert job.poll() is None, finish(job, 5)[1][-4000:]

    assert newest_checkpoint(out_dir, step, check=running) == step, f"the checkpoint of step {step} was missed"
    time.sleep(settle)  # into the steps after the checkpoint
    # The workers: the processes under each job (at any depth: multinode.sh runs torchrun under a
    # supervisor) that torchrun started, with a LOCAL_RANK their parent does not have.
    below = [process for job in jobs for process in psutil.Process(job.pid).children(recursive=True)]
    workers = {env_int(p.pid, "RANK"): p.pid for p in below if _is_worker(p)}
    assert rank in workers, f"no worker with RANK={rank} among {workers}"
    path = Path(out_dir) / "checkpoints" / "last.pt"
    assert checkpoint.load(path)[checkpoint.STEP] == step  # still where it was: nothing saved since
    os.kill(workers[rank], signal.SIGKILL)
    return path


def _is_worker(process: psutil.Process) -> bool:
    """A process torchrun started: it has a LOCAL_RANK, its parent (torchrun) none."""
    try:
        return local_rank(process.pid) is not None and local_rank(process.ppid()) is None
    except psutil.Error:  # ended while we looked
        return False


def last_checkpoint(out_dir: Path) -> dict:
    return checkpoint.load(Path(out_dir) / "checkpoints" / "last.pt")


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest max|a - b| / max|b| over the floating tensors of two state_dicts, and where."""
    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())}"
    worst, where = 0.0, ""
    for key, tb in b.items():
        if not tb.is_floating_point():
            assert torch.equal(a[key], tb), f"{key}: {a[key]} != {tb}"
            continue
        ta = a[key].double()
        diff = ((ta - tb.double()).abs().max() / tb.double().abs().max().clamp_min(1e-30)).item()
        if diff >= worst:
            worst, where = diff, key
    return worst, where


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"tensors differ: {unequal}; max rel diff {max_rel_diff(a, b)}"


# Takes a run folder's lock the way rank 0 does, says so, and holds it until its stdin closes.
_HOLDER = """
import sys
from nin_dist.run_dir import RunDir
RunDir(sys.argv[1]).open()
print("holding", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holding(folder: Path, **extra_env: str) -> Iterator[subprocess.Popen]:
    """Another process holding `folder` as a running job's rank 0 does, until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=REPO, env=env(**extra_env),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding", "the holder could not lock the folder"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
