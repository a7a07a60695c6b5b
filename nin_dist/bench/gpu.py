"""Every GPU measurement in one command, each step in its own process with its own time budget.

    PYTHONPATH=. python3 -m nin_dist.bench gpu --out DIR             # on a GPU machine, <= 8 min
    PYTHONPATH=. python3 -m nin_dist.bench gpu --out DIR --dry-run   # anywhere: every step at tiny sizes

Meant for a short visit to a GPU machine that has torch and triton but nothing else of ours: it
runs from the source tree, installs nothing, reaches no network and never imports MLflow (the
training steps run with tracking.enabled=false). The data come from $NIN_DATA_DIR (or ./data).
Steps, most valuable first:

  pytest          `pytest -m gpu`: 16-bit/tf32 kernel numerics, opcheck and torch.compile with the
                  op, the sync-free step, nccl (the MLflow tests, tests/tracking, are left out)
  kernels         `nin-bench kernels`: fused vs eager cuDNN per NiN block, bf16 and fp32
  kernels-compile `nin-bench kernels --dtypes bf16`: the same with torch.compile(max-autotune) rows
  train           `nin-bench train --config configs/fast.yaml`: img/s with the fused kernel off
                  (+compile) and on (+triton), and bf16 eager before them
  profile         a profile window of `configs/fast.yaml` (eager: torch.compile drops the named
                  regions), steps 2-4: the Chrome trace and the summary in DIR/profile-run/profile/
  d2l             the seed's run, `nin-train --config configs/d2l.yaml`: 10 epochs at 224
  tta             `nin-bench tta --config configs/fast.yaml --target 0.93`, one seed at a time for
                  as long as the total budget lasts

A step that runs past its budget is killed (its whole process group) and recorded as "timeout";
a failed step is recorded and the next one runs. DIR gets environment.json (versions, nvidia-smi),
each step's log and JSON, and summary.json; the exit status is 1 if any step did not pass.

`--dry-run` builds every step the same way and runs what a CPU can at tiny sizes: pytest collects
the GPU tests without running them, the CUDA-only kernels benchmark has its arguments parsed, and
the training steps run a few steps on a few hundred images, so this command cannot rot between
visits to a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from nin_dist.bench import kernels, train, tta
from nin_dist.bench.common import write_json

REPO = Path(__file__).resolve().parents[2]
TOTAL_S = 470.0  # all steps together; with start-up and the summary this stays under 8 minutes
TTA_TARGET = "0.93"
# What each dry-run training step adds to its command: tiny, CPU-only, MLflow-free.
_TINY = ["data.train_limit=256", "data.test_limit=100", "train.batch_size=32", "train.eval_batch_size=100",
         "train.compile=false", "train.precision=fp32", "data.resize=67"]  # 67: the 11/4 stem's smallest input


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the logs, JSON and summary")
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes, on the CPU")
    p.add_argument("--total-s", type=float, default=TOTAL_S, help="time budget of all steps together, seconds")
    p.add_argument("--steps", default="", help="comma-separated subset of the steps (default: all)")


@dataclasses.dataclass(frozen=True)
class Step:
    """One measurement: its command (after `python -m`), its budget and what to read back."""

    name: str
    budget_s: float  # the step is killed past this (or past the total budget, if sooner)
    argv: list[str]  # after `python -m`
    result: str | None = None  # the JSON it writes, relative to DIR
    summarize: Callable[[Path, str], dict] | None = None  # (DIR, log text) -> the summary's entry
    parse_only: bool = False  # dry run of a CUDA-only `nin_dist.bench` step: parse its arguments only


def _bench_json(path: Path, _log: str) -> dict:
    """The rows of a `nin-bench` JSON, less their repeats."""
    rows = json.loads(path.read_text())["rows"]
    return {"rows": [{k: v for k, v in r.items() if k != "repeats"} for r in rows]}


def _kernel_ratios(path: Path, _log: str) -> dict:
    """The fused kernel's rows: time, speedups over eager (and compile) and % of the roofline floor."""
    keys = ("C", "dtype", "mode", "ms", "speedup_vs_eager", "speedup_vs_compile", "pct_floor")
    rows = json.loads(path.read_text())["rows"]
    return {"triton": [{k: r[k] for k in keys if k in r} for r in rows if r["impl"] == "triton"]}


def _pytest_counts(xml: Path) -> Callable[[Path, str], dict]:
    def summarize(_out: Path, log: str) -> dict:
        if xml.exists():  # a run: pytest's own JUnit XML
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None]
            return {**counts, "failed": failed}
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", log)  # --collect-only
        return {"collected": int(found.group(1)) if found else 0}
    return summarize


def _metrics(path: Path, _log: str) -> dict:
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("test_acc", "test_loss", "train_loss", "img_per_s", "epochs", "wall_s")}


def _profile(path: Path, _log: str) -> dict:
    """The trace files the profile step wrote, and the head of its summary."""
    return {"traces": sorted(p.name for p in path.parent.glob("*.trace.json.gz")),
            "summary": path.read_text().splitlines()[:2]}


def build_steps(out: Path, dry_run: bool) -> list[Step]:
    """The steps in order of value, as commands; the dry run's differ only in size and device."""
    xml = out / "pytest-gpu.xml"
    # `-o addopts=`: one process, not pyproject's test workers (one GPU; the GPU image has no pytest-xdist).
    pytest = ["pytest", "-m", "gpu", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "--ignore=tests/tracking",
              "--continue-on-collection-errors", "tests"]
    pytest += ["--collect-only"] if dry_run else [f"--junitxml={xml}"]
    tiny = _TINY if dry_run else []
    train_argv = ["nin_dist.bench", "train", "--config", "configs/fast.yaml", "--repeats", "1",
                  "--json", str(out / "train.json")]
    train_argv += (["--rows", "+device", "--steps", "2", "--warmup", "1", *tiny] if dry_run
                   else ["--rows", "+bf16,+compile,+triton", "--steps", "30", "--warmup", "5"])
    profile = ["nin_dist.train", "--config", "configs/fast.yaml", "tracking.enabled=false", "train.progress=false",
               "run.resume=false", f"run.out_dir={out / 'profile-run'}", "train.compile=false"]
    profile += ([*tiny, "train.max_steps=1", "train.profile_start=1", "train.profile_steps=1"] if dry_run
                else ["train.max_steps=4", "train.profile_start=2", "train.profile_steps=3", "data.test_limit=1000"])
    d2l = ["nin_dist.train", "--config", "configs/d2l.yaml", "tracking.enabled=false", "train.progress=false",
           "run.resume=false", f"run.out_dir={out / 'd2l'}"]
    d2l += [*tiny, "train.epochs=1", "train.max_steps=3"] if dry_run else []
    return [
        Step("pytest", 90, pytest, summarize=_pytest_counts(xml)),
        Step("kernels", 50, ["nin_dist.bench", "kernels", "--compile-mode", "none",
                             "--json", str(out / "kernels.json")],
             "kernels.json", _kernel_ratios, parse_only=dry_run),
        Step("kernels-compile", 75, ["nin_dist.bench", "kernels", "--dtypes", "bf16", "--compile-mode",
                                     "max-autotune", "--json", str(out / "kernels-compile.json")],
             "kernels-compile.json", _kernel_ratios, parse_only=dry_run),
        Step("train", 90, train_argv, "train.json", _bench_json),
        # 30 s on the GPU after `train` has filled Triton's cache; the dry run's CPU start-up alone can take
        # that on a loaded 2-core machine, and its budget is no part of the GPU run's eight minutes.
        Step("profile", 120 if dry_run else 30, profile, "profile-run/profile/summary.txt", _profile),
        Step("d2l", 135, d2l, "d2l/metrics.json", _metrics),
    ]


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


def run_command(argv: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> tuple[str, int | None]:
    """Run `python -m ARGV` with output to `log`; ("ok" | "failed" | "timeout", exit code). A timeout
    kills the step's whole process group (torchrun, compile workers and pytest children too)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
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
        status, rc = run_command(step.argv, log, timeout_s, env)
    entry.update(status=status, exit_code=rc, wall_s=round(time.perf_counter() - start, 1))
    if step.result:
        entry["json"] = step.result
    if step.summarize and not step.parse_only:
        try:
            entry["result"] = step.summarize(out / step.result if step.result else out,
                                             log.read_text(errors="replace"))
        except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as err:
            entry["result_error"] = f"{type(err).__name__}: {err}"
            if status == "ok":
                entry["status"] = "failed"  # it ran but wrote nothing readable
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
    start = time.perf_counter()
    deadline = start + args.total_s
    summary = {"benchmark": "gpu", "dry_run": args.dry_run, "total_budget_s": args.total_s,
               "environment": environment(out, env), "steps": []}
    wanted = set(filter(None, args.steps.split(",")))

    def remaining() -> float:
        return deadline - time.perf_counter()

    for step in build_steps(out, args.dry_run):
        if wanted and step.name not in wanted:
            continue
        if remaining() < 5:
            summary["steps"].append({"step": step.name, "status": "skipped", "note": "no time left"})
            continue
        summary["steps"].append(run_step(step, out, min(step.budget_s, remaining()), env))
    if not wanted or "tta" in wanted:
        # one seed per process, while the time left covers one more run as long as the last
        seed, last_s = 0, 0.0
        while remaining() > max(10.0, last_s) and seed < (1 if args.dry_run else 10):
            entry = run_step(tta_step(out, seed, args.dry_run, remaining()), out, remaining(), env)
            summary["steps"].append(entry)
            last_s, seed = entry["wall_s"], seed + 1
            if entry["status"] != "ok":
                break
        if seed == 0:
            summary["steps"].append({"step": "tta", "status": "skipped", "note": "no time left"})
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["passed"] = all(s["status"] == "ok" for s in summary["steps"])
    write_json(out / "summary.json", summary)
    for s in summary["steps"]:
        print(f"  {s['step']:<16} {s['status']:<8} {s.get('wall_s', 0):>6.0f} s")
    print(f"gpu: {'all steps passed' if summary['passed'] else 'some steps did not pass'} "
          f"in {summary['wall_s']:.0f} s; summary in {out / 'summary.json'}")
    return 0 if summary["passed"] else 1
