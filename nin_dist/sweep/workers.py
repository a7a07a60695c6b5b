"""`--workers K`: K trials at once on this machine, each worker with its own share of it.

- GPUs: each worker gets `--nproc-per-node` GPUs of its own through `CUDA_VISIBLE_DEVICES` (the
  visible ones, split in order); K defaults to the visible GPUs divided by `--nproc-per-node`.
- CPU: each trial process gets `train.threads` = the cores this process may use divided by the
  trial processes running at once (K x nproc), unless the command line or the search space sets it.
  K defaults to 1 without GPUs.

The workers are threads of the nin-sweep process: each only starts a trial process and follows it.
A worker that fails stops the others; their trials stay RUNNING in the study, for the next worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass

from nin_dist.errors import ConfigError


@dataclass(frozen=True)
class Share:
    """One worker's part of the machine: variables and overrides of its trials."""

    env: dict[str, str]
    overrides: list[str]


def visible_gpus() -> list[str]:
    """The GPUs trials may use: `CUDA_VISIBLE_DEVICES` when set, else those nvidia-smi lists (no torch
    import in the sweep process: its start stays short)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")] \
        if out.returncode == 0 else []


def shares(workers: int | None, nproc: int, threads_fixed: bool, gpus: list[str] | None = None,
           cores: int | None = None) -> list[Share]:
    """Each worker's share (see the module doc); ConfigError when K workers do not fit."""
    gpus = visible_gpus() if gpus is None else gpus
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    if workers is None:
        workers = max(1, len(gpus) // nproc)
    if gpus and workers * nproc > len(gpus):
        raise ConfigError(f"--workers {workers} x --nproc-per-node {nproc} is not allowed: {len(gpus)} GPUs are "
                          f"visible ({','.join(gpus)}); each worker takes GPUs of its own")
    threads = max(1, cores // (workers * nproc))
    out = []
    for index in range(workers):
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus[index * nproc:(index + 1) * nproc])} if gpus else {}
        out.append(Share(env, [] if threads_fixed else [f"train.threads={threads}"]))
    return out


def run_all(targets: list, stop: threading.Event) -> None:
    """Run each target in a thread; the first error stops the others (through `stop`) and is raised here,
    after they have stopped. The main thread waits in short steps, so it still takes signals."""
    errors: list[BaseException] = []

    def work(target) -> None:
        try:
            target()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread below
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=work, args=(target,), name=f"sweep-worker-{i}", daemon=True)
               for i, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except BaseException:
        stop.set()  # Ctrl-C or SIGTERM: every worker stops its trial before the process ends
        for thread in threads:
            thread.join()
        raise
    real = [err for err in errors if not isinstance(err, SystemExit)]
    if real:
        raise real[0]
