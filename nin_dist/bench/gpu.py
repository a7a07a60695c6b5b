"""Every GPU measurement, planned for visits of at most 15 minutes in calls of at most 10, each step in
its own process under its own time limit, each writing its results row by row.

    PYTHONPATH=. python3 -m nin_dist.bench gpu --out DIR              # first visit: <= 9 min, one call
    PYTHONPATH=. python3 -m nin_dist.bench gpu --out DIR --visit 2    # the next visit: the long runs
    PYTHONPATH=. python3 -m nin_dist.bench gpu --out DIR --dry-run    # anywhere: every step, tiny, on the CPU

Meant for a short visit to a GPU machine that has torch and triton but nothing else of ours: it
runs from the source tree, installs nothing, reaches no network and never imports MLflow (the
training steps run with tracking.enabled=false). The data come from $NIN_DATA_DIR (or ./data).

The plan. A visit's 15 minutes hold the machine's start, one call of this command and the copy
back; a call may run 10. So each visit is one call whose steps' limits sum to 540 s (9 min), with
a minute left for Python's start, environment.json and the summary. Steps, most valuable first:

  visit 1 (540 s)
  kernel-tests   120 s  every test of tests/kernels on the GPU (`-o addopts=`: one process, no xdist)
  kernels        160 s  kernel_rows: y and five gradients vs cuDNN, do_bench and CUDA-graph times, a
                        profiler trace per block, datasheet peaks by card, traffic's predictions
                        beside, kernels.overhead's µs; bf16 and fp32-as-TF32, NCHW, batch 128 and 256
  tiles           75 s  tile_sweep: AOT-clean tile configs of each kernel, one timed row each
  train-compile   70 s  `nin-bench train --rows +compile` (configs/fast.yaml; NiN's compile is most of it)
  train-triton    60 s  `nin-bench train --rows +triton`: the pair against +compile
  gpu-tests       30 s  the other `pytest -m gpu` tests: opcheck, compile, sync-free step, nccl
  profile         25 s  a profile window of configs/fast.yaml, eager (DIR/profile-run/profile/)

  visit 2 (540 s)
  kernels-compile 150 s `nin-bench kernels --compile-mode max-autotune`, bf16
  d2l             150 s the seed's run, `nin-train --config configs/d2l.yaml`: 10 epochs at 224
  tta             240 s `nin-bench tta --target 0.93`, one seed at a time while the time lasts

Rows. Each step's results go to DIR/<step>.jsonl, one JSON object a line, appended and flushed as
each is measured (nin_dist.bench.rows); a step killed at its limit (its whole process group), or a
visit cut short by the machine, keeps every finished row. The tests stream one row per test (a
pytest plugin, nin_dist.bench.pytest_rows): pytest's JUnit XML, written at the end, is lost on a
kill. Steps that write one JSON at their end (train, tta, d2l) have its rows copied to their .jsonl
when they finish. DIR/steps.jsonl gets a row per finished step; summary.json, environment.json
(versions, nvidia-smi) and each step's log are there too. Exit status 1 if any step did not pass.
A step's process dies with this command (PR_SET_PDEATHSIG), so a kill of the command leaves no
step running.

`--dry-run` builds every step of both visits the same way and runs what a CPU can at tiny sizes:
pytest collects the tests (a row each), the kernel and tile steps run on Triton's interpreter at
toy sizes, kernels-compile has its arguments parsed, and the training steps run a few steps on a
few hundred images, so this command cannot rot between visits to a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nin_dist.bench import kernels, train, tta
from nin_dist.bench.common import write_json
from nin_dist.bench.rows import RowWriter, read_rows

REPO = Path(__file__).resolve().parents[2]
CALL_LIMIT_S = 600.0  # what one command on the GPU machine may run
VISIT_LIMIT_S = 900.0  # a whole visit: the machine's start, the calls, the copy back
MACHINE_START_S = 240.0  # what the start and the copy back may take (a fresh machine takes minutes)
TOTAL_S = 540.0  # each visit's one call: its steps' limits, with a minute left for the rest
DRY_STEP_S = 300.0  # a dry-run step's limit on a loaded 2-core CPU; no part of any GPU plan
TTA_TARGET = "0.93"
# What each dry-run training step adds to its command: tiny, CPU-only, MLflow-free.
_TINY = ["data.train_limit=256", "data.test_limit=100", "train.batch_size=32", "train.eval_batch_size=100",
         "train.compile=false", "train.precision=fp32", "data.resize=67"]  # 67: the 11/4 stem's smallest input


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the rows, logs and summary")
    p.add_argument("--visit", type=int, choices=(1, 2), default=1,
                   help="1: tests, kernels, tiles, training pair, profile; 2: max-autotune, d2l, tta")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes, on the CPU")
    p.add_argument("--total-s", type=float, help="time limit of all steps together, seconds (default: the plan's)")
    p.add_argument("--steps", default="", help="comma-separated subset of the visit's steps (default: all)")


@dataclasses.dataclass(frozen=True)
class Step:
    """One measurement: its command (after `python -m`), its time limit and where its results land."""

    name: str
    budget_s: float  # the step is killed past this (or past the visit's total, if sooner)
    argv: list[str]  # after `python -m`
    result: str | None = None  # a JSON it writes at its end, relative to DIR
    summarize: Callable[[Path, str], dict] | None = None  # (DIR, log text) -> the summary's entry
    parse_only: bool = False  # dry run of a CUDA-only `nin_dist.bench` step: parse its arguments only
    env: tuple[tuple[str, str], ...] = ()  # added to the step's environment

    @property
    def rows(self) -> str:
        return f"{self.name}.jsonl"


def _json_rows(path: Path) -> list[dict]:
    """The rows of a `nin-bench` JSON, less their repeats."""
    rows = json.loads(path.read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "repeats"} for r in rows]


def _bench_json(path: Path, _log: str) -> dict:
    return {"rows": _json_rows(path)}


def _kernel_ratios(path: Path, _log: str) -> dict:
    """The fused kernel's rows: time, speedups over eager (and compile) and % of the roofline floor."""
    keys = ("C", "dtype", "mode", "ms", "speedup_vs_eager", "speedup_vs_compile", "pct_floor")
    rows = json.loads(path.read_text())["rows"]
    return {"triton": [{k: r[k] for k in keys if k in r} for r in rows if r["impl"] == "triton"]}


def _test_counts(path: Path, _log: str) -> dict:
    """Outcomes of the streamed test rows, and the failed tests' ids."""
    counts: dict[str, int] = {}
    failed = []
    for r in read_rows(path):
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        if r["outcome"] == "failed":
            failed.append(r["test"])
    return {**counts, "failed": failed}


def _row_kinds(path: Path, _log: str) -> dict:
    """How many rows of each kind a streamed step wrote."""
    counts: dict[str, int] = {}
    for r in read_rows(path):
        counts[r.get("kind", "?")] = counts.get(r.get("kind", "?"), 0) + 1
    return {"rows": counts}


def _metrics(path: Path, _log: str) -> dict:
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("test_acc", "test_loss", "train_loss", "img_per_s", "epochs", "wall_s")}


def _profile(path: Path, _log: str) -> dict:
    """The trace files the profile step wrote, and the head of its summary."""
    return {"traces": sorted(p.name for p in path.parent.glob("*.trace.json.gz")),
            "summary": path.read_text().splitlines()[:2]}


def _pytest(out: Path, name: str, targets: list[str], dry_run: bool) -> Step:
    # `-o addopts=`: one process, not pyproject's test workers (one GPU; the GPU image has no pytest-xdist)
    argv = ["pytest", "-q", "-rA", "-o", "addopts=", "-p", "no:cacheprovider", "-p", "nin_dist.bench.pytest_rows",
            "--continue-on-collection-errors", *targets]
    argv += ["--collect-only"] if dry_run else [f"--junitxml={out / (name + '.xml')}"]
    return Step(name, 0.0, argv, summarize=_test_counts, env=(("NIN_PYTEST_ROWS", str(out / f"{name}.jsonl")),))


def _train(out: Path, name: str, row: str, dry_run: bool) -> Step:
    argv = ["nin_dist.bench", "train", "--config", "configs/fast.yaml", "--repeats", "1",
            "--json", str(out / f"{name}.json")]
    argv += (["--rows", "+device", "--steps", "2", "--warmup", "1", *_TINY] if dry_run
             else ["--rows", row, "--steps", "30", "--warmup", "5"])
    return Step(name, 0.0, argv, f"{name}.json", _bench_json)


def visit_steps(out: Path, visit: int, dry_run: bool) -> list[Step]:
    """A visit's steps in order of value, as commands with their limits; the dry run's differ only in
    size, device and limits."""
    interpret = (("TRITON_INTERPRET", "1"),) if dry_run else ()
    tiny = ["--tiny"] if dry_run else []
    if visit == 1:
        profile = ["nin_dist.train", "--config", "configs/fast.yaml", "tracking.enabled=false",
                   "train.progress=false", "run.resume=false", f"run.out_dir={out / 'profile-run'}",
                   "train.compile=false"]
        profile += ([*_TINY, "train.max_steps=1", "train.profile_start=1", "train.profile_steps=1"] if dry_run
                    else ["train.max_steps=4", "train.profile_start=2", "train.profile_steps=3",
                          "data.test_limit=1000"])
        planned = [
            (120, _pytest(out, "kernel-tests", ["tests/kernels"], dry_run)),
            (160, Step("kernels", 0.0, ["nin_dist.bench.kernel_rows", "--jsonl", str(out / "kernels.jsonl"),
                                        "--trace-dir", str(out / "traces"), *tiny],
                       summarize=_row_kinds, env=interpret)),
            (75, Step("tiles", 0.0, ["nin_dist.bench.tile_sweep", "--jsonl", str(out / "tiles.jsonl"), *tiny],
                       summarize=_row_kinds, env=interpret)),
            (70, _train(out, "train-compile", "+compile", dry_run)),
            (60, _train(out, "train-triton", "+triton", dry_run)),
            (30, _pytest(out, "gpu-tests", ["-m", "gpu", "--ignore=tests/tracking", "--ignore=tests/kernels",
                                            "tests"], dry_run)),
            (25, Step("profile", 0.0, profile, "profile-run/profile/summary.txt", _profile)),
        ]
    else:
        d2l = ["nin_dist.train", "--config", "configs/d2l.yaml", "tracking.enabled=false", "train.progress=false",
               "run.resume=false", f"run.out_dir={out / 'd2l'}"]
        d2l += [*_TINY, "train.epochs=1", "train.max_steps=3"] if dry_run else []
        planned = [
            (150, Step("kernels-compile", 0.0, ["nin_dist.bench", "kernels", "--dtypes", "bf16", "--compile-mode",
                                                "max-autotune", "--json", str(out / "kernels-compile.json")],
                       "kernels-compile.json", _kernel_ratios, parse_only=dry_run)),
            (150, Step("d2l", 0.0, d2l, "d2l/metrics.json", _metrics)),
        ]
    return [dataclasses.replace(step, budget_s=DRY_STEP_S if dry_run else budget) for budget, step in planned]


def planned_s(visit: int) -> dict[str, float]:
    """The real run's time limit per step of a visit (tta: what the visit's total leaves it)."""
    plan = {s.name: s.budget_s for s in visit_steps(Path("/plan"), visit, dry_run=False)}
    if visit == 2:
        plan["tta"] = TOTAL_S - sum(plan.values())
    return plan


def tta_step(out: Path, seed: int, dry_run: bool, budget_s: float) -> Step:
    argv = ["nin_dist.bench", "tta", "--config", "configs/fast.yaml", "--seeds", str(seed),
            "--json", str(out / f"tta-seed{seed}.json")]
    argv += (["--target", "0.1", *_TINY, "train.epochs=1", "optim.warmup_epochs=0.5"] if dry_run
             else ["--target", TTA_TARGET])
    return Step(f"tta-seed{seed}", budget_s, argv, f"tta-seed{seed}.json", _bench_json)


def child_env(dry_run: bool) -> dict[str, str]:
    """The steps' environment: this source tree first on PYTHONPATH (no install needed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, whatever this machine has
    return env


def _die_with_parent() -> None:
    """In the step's process, before it runs: SIGKILL it when this command dies, however it dies (a
    kill at the visit's end is a SIGKILL that no handler sees, and the step is in its own group)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def run_command(argv: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> tuple[str, int | None]:
    """Run `python -m ARGV` with output to `log`; ("ok" | "failed" | "timeout", exit code). A timeout
    kills the step's whole process group (torchrun, compile workers and pytest children too)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", None
    return ("ok" if rc == 0 else "failed"), rc


def parse_bench_args(argv: list[str]) -> None:
    """Parse `nin-bench ARGV` as the command line would, raising ValueError on a bad argument."""
    benchmarks = {"kernels": kernels, "train": train, "tta": tta}  # the ones the steps run
    parser = argparse.ArgumentParser(prog=f"nin-bench {argv[0]}", exit_on_error=False)
    parser.add_argument("--json")
    benchmarks[argv[0]].add_arguments(parser)
    try:
        parser.parse_args(argv[1:])
    except (argparse.ArgumentError, SystemExit) as err:
        raise ValueError(f"nin-bench {' '.join(argv)}: {err}") from None


def run_step(step: Step, out: Path, timeout_s: float, env: dict[str, str]) -> dict:
    """Run one step; its summary entry (status, seconds, log, JSON, the numbers read back)."""
    log = out / f"{step.name}.log"
    entry = {"step": step.name, "budget_s": step.budget_s, "timeout_s": round(timeout_s, 1),
             "command": ["python", "-m", *step.argv],
             "log": log.name}
    start = time.perf_counter()
    if step.parse_only:
        try:
            parse_bench_args(step.argv[1:])
            status, rc, note = "ok", 0, "dry run: arguments parsed; the benchmark itself needs CUDA"
        except ValueError as err:
            status, rc, note = "failed", 2, str(err)
        log.write_text(note + "\n")
        entry["note"] = note
    else:
        status, rc = run_command(step.argv, log, timeout_s, dict(env, **dict(step.env)))
    entry.update(status=status, exit_code=rc, wall_s=round(time.perf_counter() - start, 1))
    if step.result:
        entry["json"] = step.result
    if step.summarize and not step.parse_only:
        try:
            entry["result"] = step.summarize(out / (step.result or step.rows),
                                             log.read_text(errors="replace"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            entry["result_error"] = f"{type(err).__name__}: {err}"
            if status == "ok":
                entry["status"] = "failed"  # it ran but wrote nothing readable
    if step.result and "result" in entry:  # a JSON written at the step's end: its rows join the others
        writer = RowWriter(out / step.rows, step=step.name)
        try:
            rows = _json_rows(out / step.result)
        except (OSError, ValueError, KeyError, TypeError):
            rows = [entry["result"]]
        for row in rows:
            writer.write(**row)
    print(f"gpu: {step.name}: {entry['status']} in {entry['wall_s']:.0f} s "
          f"(budget {timeout_s:.0f} s), log {log}", flush=True)
    return entry


def environment(out: Path, env: dict[str, str]) -> dict:
    """Versions, the GPU as nvidia-smi sees it, and where the data are (written to environment.json)."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "argv": sys.argv,
            "NIN_DATA_DIR": os.environ.get("NIN_DATA_DIR")}
    info["versions"] = versions()
    for key, cmd in (("nvidia_smi", ["nvidia-smi"]),
                     ("nvidia_smi_query", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                           "clocks.max.sm,power.limit", "--format=csv"]),
                     ("commit", ["git", "-C", str(REPO), "rev-parse", "HEAD"])):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, cwd=REPO)
            info[key] = (proc.stdout.strip() if proc.returncode == 0
                         else f"exit {proc.returncode}: {proc.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as err:
            info[key] = f"{type(err).__name__}: {err}"
    (out / "nvidia-smi.txt").write_text(str(info["nvidia_smi"]) + "\n")
    write_json(out / "environment.json", info)
    return info


def versions() -> dict:
    """torch, torchvision, triton, CUDA and cuDNN as this python has them (no CUDA context is made)."""
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "cuda_available": torch.cuda.is_available()}
    for name in ("torchvision", "triton", "numpy"):
        try:
            found[name] = __import__(name).__version__
        except ImportError as err:
            found[name] = f"not importable: {err}"
    return found


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(args.dry_run)
    steps = visit_steps(out, args.visit, args.dry_run)
    wanted = set(filter(None, args.steps.split(",")))
    known = {s.name for s in steps} | ({"tta"} if args.visit == 2 else set())
    if wanted - known:
        print(f"nin-bench gpu: no step {', '.join(sorted(wanted - known))} in visit {args.visit} "
              f"(its steps: {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    total_s = args.total_s or (DRY_STEP_S * (len(steps) + 1) if args.dry_run else TOTAL_S)
    start = time.perf_counter()
    deadline = start + total_s
    summary = {"benchmark": "gpu", "visit": args.visit, "dry_run": args.dry_run, "total_budget_s": total_s,
               "plan_s": planned_s(args.visit), "environment": environment(out, env), "steps": []}
    finished = RowWriter(out / "steps.jsonl", visit=args.visit)  # a row per step, as each ends

    def remaining() -> float:
        return deadline - time.perf_counter()

    def record(entry: dict) -> dict:
        summary["steps"].append(entry)
        finished.write(**entry)
        return entry

    for step in steps:
        if wanted and step.name not in wanted:
            continue
        if remaining() < 5:
            record({"step": step.name, "status": "skipped", "note": "no time left"})
            continue
        record(run_step(step, out, min(step.budget_s, remaining()), env))
    if args.visit == 2 and (not wanted or "tta" in wanted):
        # one seed per process, while the time left covers one more run as long as the last
        seed, last_s = 0, 0.0
        while remaining() > max(10.0, last_s) and seed < (1 if args.dry_run else 10):
            budget = min(remaining(), DRY_STEP_S) if args.dry_run else remaining()
            entry = record(run_step(tta_step(out, seed, args.dry_run, budget), out, budget, env))
            last_s, seed = entry["wall_s"], seed + 1
            if entry["status"] != "ok":
                break
        if seed == 0:
            record({"step": "tta", "status": "skipped", "note": "no time left"})
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["passed"] = all(s["status"] == "ok" for s in summary["steps"])
    write_json(out / "summary.json", summary)
    for s in summary["steps"]:
        print(f"  {s['step']:<16} {s['status']:<8} {s.get('wall_s', 0):>6.0f} s")
    print(f"gpu: visit {args.visit}: {'all steps passed' if summary['passed'] else 'some steps did not pass'} "
          f"in {summary['wall_s']:.0f} s; rows in {out}/*.jsonl, summary in {out / 'summary.json'}")
    return 0 if summary["passed"] else 1
