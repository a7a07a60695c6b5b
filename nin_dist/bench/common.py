"""What every benchmark shares: the machine it ran on, a text table, medians of repeats, means and
sample standard deviations over seeds, JSON out."""

from __future__ import annotations

import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from nin_dist.precision import cpu_flags

    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu_name(),
            # a CPU without it emulates bf16, and train.precision=auto then trains in fp32 (nin_dist.precision)
            "cpu_avx512_bf16": "avx512_bf16" in cpu_flags(),
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu(info: dict) -> str:
    """`CPU: AMD EPYC (avx512_bf16: yes), 2 threads`: the line a benchmark of whole trainings prints
    with its table (`info` from `machine()`)."""
    return (f"CPU: {info['cpu']} (avx512_bf16: {'yes' if info['cpu_avx512_bf16'] else 'no'}), "
            f"{info['cpu_threads']} threads")


def add_config_arguments(p, repeats: int | None = None) -> None:
    """`--config` and trailing `key=value` overrides: how a benchmark that trains names its job; with
    `repeats`, also `--repeats` (that many by default)."""
    p.add_argument("--config", default="configs/cpu.yaml", help="YAML config of the job")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats,
                       help="runs of every measurement, interleaved; the median is shown")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table of `rows` (dicts) in `columns` order; floats get 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def median_of_repeats(repeats: list[dict]) -> dict:
    """One row from several measurements of it: the median of each numeric field, other fields from
    the first; the measurements themselves stay under "repeats" (a shared machine is noisy, and a
    median of interleaved repeats is what survives a burst of load from elsewhere)."""
    row = dict(repeats[0])
    for key, value in repeats[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in repeats)
    if len(repeats) > 1:
        row["repeats"] = repeats
    return row


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of a measurement over seeds. The mean is None when a
    value is missing (None: a seed that never got there) or there are none; the sd also with one value."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def plus_minus(mean: float | None, sd: float | None, digits: int, signed: bool = False) -> str:
    """`0.9012 ± 0.0011` (`+` before a positive mean when `signed`); `-` for an undefined mean; the
    mean alone without an sd."""
    if mean is None:
        return "-"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if sd is None else f"{text} ± {sd:.{digits}f}"


def write_json(path: str | Path | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
