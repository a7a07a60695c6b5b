"""`nin-bench`: benchmarks that print a table and write JSON. Not tests: numbers, side by side.

    nin-bench data      # our device-resident batches vs the seed's torchvision DataLoader
    nin-bench kernels   # fused Triton 1x1 pairs vs cuDNN eager vs torch.compile (CUDA)
    nin-bench train     # training img/s and MFU: the seed's recipe, then each switch added
    nin-bench scaling   # 1 process vs N torchrun processes, same global batch
    nin-bench tta       # wall seconds to a target test accuracy, median over seeds

Every benchmark measures its baseline in the same run and reports ratios to it; absolute times mean
something only on the machine named in the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from nin_dist.errors import UserError
from nin_dist.logs import init_logging

BENCHMARKS = {
    "data": "nin_dist.bench_data",
    "kernels": "nin_dist.bench_kernels",
    "train": "nin_dist.bench_train",
    "scaling": "nin_dist.bench_scaling",
    "tta": "nin_dist.bench_tta",
}


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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


def write_json(path: str | Path | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nin-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            if err.name != module_name:
                raise
            continue
        modules[name] = module
        p = sub.add_parser(name, help=(module.__doc__ or "").splitlines()[0])
        p.add_argument("--json", metavar="PATH", help="write the results here")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    init_logging(0)
    try:
        return modules[args.bench].run(args)
    except UserError as err:
        print(f"nin-bench: error: {err}", file=sys.stderr)
        return err.exit_code


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
