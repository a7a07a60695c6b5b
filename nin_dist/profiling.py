"""The profile window: a few global steps under torch.profiler on every rank, traced into the run folder.

`train.profile_steps=K` (0, the default, is off) with `train.profile_start=S` profiles global steps
S .. S+K-1 (step 1 is a run's first step) on every rank. Each rank writes one gzipped Chrome trace,
`RUN_DIR/profile/rank<R>-steps<S>-<E>.trace.json.gz`, which Perfetto (ui.perfetto.dev) and
chrome://tracing open as they are; rank 0 also writes `summary.txt` (top ops by self time, their
share of the profiled steps, the FLOPs torch counts) and logs all of them to MLflow under `profile/`.
With `train.profile_memory=true` (CUDA only) each rank also dumps the caching allocator's history of
the window, `rank<R>-memory.pickle`, for pytorch.org/memory_viz.

Named regions (`region(name)`, torch's `record_function`) mark each NiN block, its k x k conv, its
BatchNorm, its 1x1 pair, the pools, the loss, backward, the optimizer step and the evaluation, so a
trace reads without the code. The gradient all-reduce needs no region: the profiler records the
process group's own `gloo:all_reduce` (CPU, on gloo's worker threads, launch to completion) and
NCCL's kernels (GPU), and a hook of ours in DDP would change how it reduces. A region costs a
dispatcher call even with no profiler running (~20 us here), so they are on only while a window
runs: off, `region` returns one shared no-op context (a Python call, <1 us). Under torch.compile the
regions inside the compiled model are dropped by dynamo (no graph break); profile eager to see them.

A window is decided by global steps alone, the same on every rank: a run resumed inside it profiles
the steps left; resumed past it, none.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from nin_dist import distributed

log = logging.getLogger(__name__)

FOLDER = "profile"  # in the run folder, and the MLflow artifact path
SUMMARY = "summary.txt"
TOP_OPS = 25  # rows of the summary's table

_OFF = contextlib.nullcontext()
_regions = False


def enable_regions(on: bool) -> None:
    """Turn the named regions on (a run with a profile window) or off (every other run)."""
    global _regions
    _regions = on


def region(name: str):
    """A named range in the trace while regions are on; a shared no-op context otherwise."""
    return torch.profiler.record_function(name) if _regions else _OFF


def trace_name(rank: int, first: int, last: int) -> str:
    return f"rank{rank}-steps{first}-{last}.trace.json.gz"


class ProfileWindow:
    """Profiles global steps `first`..`last` on this rank: `at(done)` is called with the number of
    steps done, once before the first step (by make_window) and after each. The trace (and summary,
    memory snapshot) is written when the window's last step is done, or the run's, if sooner."""

    def __init__(self, train, info, run_dir: Path, last: int, tracker):
        self.first, self.last = train.profile_start, last
        self.info, self.folder, self.tracker = info, Path(run_dir) / FOLDER, tracker
        self.memory = train.profile_memory and info.device.type == "cuda"
        if train.profile_memory and not self.memory:  # train.device=auto without CUDA (cpu is refused)
            log.warning("profile: train.profile_memory ignored: it records CUDA's allocator, and this run is on %s",
                        info.device)
        self._prof, self._started, self._from = None, 0.0, 0
        # Regions on while the window lasts. A compiled model guards on the switch, and would compile
        # again at each turn (in the window, at that): there they stay on for the run, and cost only
        # outside the model, where they are eager (dynamo drops those inside it).
        self._regions_for_run = train.compile
        enable_regions(self._regions_for_run)

    def at(self, done: int) -> None:
        if self._prof is not None:
            if done >= self.last:
                self._finish(done)
            else:
                self._prof.step()  # the next step's ProfilerStep#N range
        elif self.first - 1 <= done < self.last:
            self._start(done + 1)

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.info.device.type == "cpu":
            # Kineto looks for a GPU in a CUDA build of torch and logs an ERROR line when there is none;
            # on the CPU that line is noise. Read when the profiler first starts in this process.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        if self.info.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        # A schedule that always records: the profiler then marks each step as ProfilerStep#<global step>.
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, with_flops=True,
                                            schedule=lambda _: torch.profiler.ProfilerAction.RECORD)
        self._prof.step_num = step
        enable_regions(True)
        self._from = step
        log.info("profile: steps %d-%d on every rank", step, self.last)
        self._started = time.perf_counter()
        self._prof.start()

    def _finish(self, done: int) -> None:
        prof, self._prof, self.last = self._prof, None, done
        enable_regions(self._regions_for_run)
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        prof.stop()
        seconds = time.perf_counter() - self._started
        self.folder.mkdir(parents=True, exist_ok=True)
        first, rank = self._from, self.info.rank
        names = [trace_name(rank, first, done)]
        _write_atomically(self.folder / names[0], prof.export_chrome_trace)
        if self.memory:
            names.append(f"rank{rank}-memory.pickle")
            _write_atomically(self.folder / names[1], torch.cuda.memory._dump_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.info.is_main:
            summary = summarize(prof, first, done, seconds, self.info)
            _write_atomically(self.folder / SUMMARY, lambda path: Path(path).write_text(summary))
        log.info("profile: steps %d-%d traced to %s (%.1f s for %d steps under the profiler)", first, done,
                 self.folder / names[0], seconds, done - first + 1)
        distributed.barrier()  # every rank's files are written before rank 0 logs them
        if self.info.is_main:
            traces = [trace_name(r, first, done) for r in range(self.info.world_size)]
            memory = [f"rank{r}-memory.pickle" for r in range(self.info.world_size)] if len(names) > 1 else []
            for name in [*traces, *memory, SUMMARY]:
                path = self.folder / name
                # Only the files this window wrote, as regular files: a link planted in the run folder
                # would have the tracker copy whatever it points at.
                if path.is_file() and not path.is_symlink():
                    self.tracker.log_artifact_file(path, FOLDER)
                else:
                    log.warning("profile: %s is missing or not a regular file; not logged", path)


def _write_atomically(path: Path, write) -> None:
    """`write(tmp)` into a fresh file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".gz" if path.suffix == ".gz" else "")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summarize(prof, first: int, last: int, seconds: float, info) -> str:
    """The window's top ops by self time (calls, milliseconds per step, share of the step), then the ops
    torch counts FLOPs for (forward convs and matmuls, elementwise arithmetic) with their rates."""
    steps = last - first + 1
    cuda = info.device.type == "cuda"
    events = prof.key_averages()

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    def total_us(e) -> float:
        return e.device_time_total if cuda else e.cpu_time_total

    step_ms = 1e3 * seconds / steps
    clock = "GPU" if cuda else "CPU"
    top = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)[:TOP_OPS]
    lines = [f"profile of global steps {first}-{last} on rank {info.rank} of {info.world_size} "
             f"({info.device}, torch {torch.__version__})",
             f"{steps} steps in {seconds:.3f} s under the profiler: {step_ms:.1f} ms per step", "",
             f"top {len(top)} ops by self {clock} time (share: of a step's wall time)",
             f"{'self ms/step':>12}  {'share':>6}  {'calls/step':>10}  op"]
    lines += [f"{self_us(e) / 1e3 / steps:12.3f}  {self_us(e) / 1e3 / steps / step_ms:6.1%}  "
              f"{e.count / steps:10.1f}  {e.key}" for e in top]
    counted = sorted((e for e in events if e.flops), key=lambda e: e.flops, reverse=True)[:TOP_OPS]
    lines += ["", f"FLOPs as torch counts them (forward only: backward ops are not counted), with the {clock} "
              f"time of the op and all it calls", f"{'GFLOP/step':>10}  {'ms/step':>8}  {'GFLOP/s':>8}  op"]
    for e in counted:
        gflop, ms = e.flops / 1e9 / steps, total_us(e) / 1e3 / steps
        lines.append(f"{gflop:10.4f}  {ms:8.3f}  {gflop / (ms / 1e3) if ms else 0.0:8.1f}  {e.key}")
    return "\n".join(lines) + "\n"


class NullWindow:
    """A run without a window (or resumed past it): no profiler is made, and the regions stay off."""

    def __init__(self):
        enable_regions(False)

    def at(self, done: int) -> None: ...


def make_window(train, info, run_dir: Path, done: int, batches, tracker):
    """The run's window from here (`done` steps done), checked at `done`; a NullWindow when
    train.profile_steps=0 or the window lies behind. It ends at the run's last step if that comes first."""
    last = min(train.profile_start + train.profile_steps - 1, train.max_steps or math.inf,
               batches.steps_per_epoch * train.epochs)
    if train.profile_steps and last < train.profile_start:
        log.warning("profile: train.profile_start=%d is past the run's last step %d; nothing profiled",
                    train.profile_start, last)
    elif train.profile_steps and done >= last:
        log.info("profile: steps up to %d were profiled before this resume; not again", last)
    if not train.profile_steps or done >= last or last < train.profile_start:
        return NullWindow()
    window = ProfileWindow(train, info, run_dir, last, tracker)
    window.at(done)
    return window
