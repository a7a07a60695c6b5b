"""Training throughput: the seed's recipe, then ours with each switch added one at a time.

Rows, each in a fresh process (so compile caches and peak memory do not leak between rows):
  seed      torchvision FashionMNIST + PIL Resize/ToTensor through a DataLoader (d2l: 4 workers),
            fp32, NCHW, eager, a plain nn.Sequential with torch's own BatchNorm/Dropout
  +device   our device-resident uint8 splits, batches scaled and resized on the device
  +cl       + channels_last
  +bf16     + bf16 autocast
  +compile  + torch.compile
  +triton   + the fused Triton 1x1 kernels (CUDA only)
Each row runs the same config (`--config`, default configs/cpu.yaml) for `--steps` timed steps after
`--warmup`. "step img/s" times only the step (the d2l way: the batch is fetched before the timer
starts); "wall img/s" includes fetching the batch. Every row runs `--repeats` times, the rows
interleaved; each repeat's ratio is to the seed row of that repeat, and the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nin_dist.bench.common import add_config_arguments, format_table, machine, median_of_repeats, write_json
from nin_dist.bench.jobs import last_line
from nin_dist.bench.seed import plain_sequential, seed_loader
from nin_dist.config import Config, load_config, replace
from nin_dist.data import TrainBatches, find_root, load_split
from nin_dist.model import build_model
from nin_dist.optim import build_optimizer
from nin_dist.perf import peak_flops, train_flops_per_image
from nin_dist.precision import autocast, memory_format

ROWS = ("seed", "+device", "+cl", "+bf16", "+compile", "+triton")


def add_arguments(p) -> None:
    add_config_arguments(p, repeats=3)
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row (compile happens here)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the seed row (d2l: 4)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process


def _row_config(cfg: Config, row: str) -> Config:
    on = ROWS[: ROWS.index(row) + 1]
    return replace(cfg, train={"channels_last": "+cl" in on, "precision": "bf16" if "+bf16" in on else "fp32",
                               "compile": "+compile" in on},
                   model={"kernel": "triton" if "+triton" in on else "torch"})


def measure_row(cfg: Config, row: str, steps: int, warmup: int, workers: int) -> dict:
    """Train `warmup + steps` steps in this process; return img/s, MFU and peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _row_config(cfg, row)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, device)
    if row == "seed":
        model = plain_sequential(model).to(device)
    fmt = memory_format(cfg.train)
    model = model.to(memory_format=fmt)
    opt = build_optimizer(model, cfg.optim)
    step_fn = torch.compile(model) if cfg.train.compile else model
    root = find_root(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        if row == "seed":
            batches = iter(seed_loader(root, Path(tmp), cfg.data.resize, cfg.train.batch_size, workers,
                                       normalize=cfg.data.normalize, drop_last=True))
        else:
            split = load_split(root, "train").to(device)
            batches = TrainBatches(split, cfg.data, cfg.train.batch_size, 0, 1, cfg.seed).epoch(0)
        step_s = 0.0
        wall0 = None
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                wall0, step_s = time.perf_counter(), 0.0
            x, y = next(batches)
            t0 = time.perf_counter()
            x, y = x.to(device, memory_format=fmt), y.to(device)
            opt.zero_grad(set_to_none=True)
            with autocast(cfg.train, device):
                loss = F.cross_entropy(step_fn(x), y)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s += time.perf_counter() - t0
        wall_s = time.perf_counter() - wall0
    images = steps * cfg.train.batch_size
    flops = train_flops_per_image(cfg)
    peak_mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"row": row, "step_img_per_s": images / step_s, "wall_img_per_s": images / wall_s,
            "mfu": images / step_s * flops / peak_flops(device, cfg.train.precision),
            "peak_mem_gib": peak_mem / 2**30, "final_loss": loss.item(), "device": str(device)}


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.row:  # a child process: one row, JSON on stdout
        print(json.dumps(measure_row(cfg, args.row, args.steps, args.warmup, args.workers)))
        return 0
    names = args.rows.split(",")
    measured: dict[str, list[dict]] = {name: [] for name in names}
    skipped = {}
    for _ in range(args.repeats):  # rows interleaved: a burst of load hits one repeat, not one row
        for name in names:
            if name == "+triton" and not torch.cuda.is_available():
                skipped[name] = "skipped: the Triton kernels need CUDA"
                continue
            cmd = [sys.executable, "-m", "nin_dist.bench", "train", "--row", name, "--config", args.config,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--workers", str(args.workers),
                   *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                skipped[name] = f"failed: {last_line(proc.stderr)[:80]}"
                continue
            measured[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = measured.get("seed", [])
    for repeats in measured.values():
        # Each repeat's ratio to the seed row of the same repeat; the row reports their median.
        for i, r in enumerate(repeats):
            if i < len(base):
                r["step_ratio"] = r["step_img_per_s"] / base[i]["step_img_per_s"]
                r["wall_ratio"] = r["wall_img_per_s"] / base[i]["wall_img_per_s"]
    rows = [median_of_repeats(measured[name]) if measured[name] and name not in skipped
            else {"row": name, "note": skipped.get(name, "")} for name in names]
    print(f"training throughput, {args.config} {' '.join(args.overrides)}: {args.steps} steps after "
          f"{args.warmup} warm-up, median of {args.repeats}, "
          f"FLOPs/train image {train_flops_per_image(cfg) / 1e9:.3f} G")
    print(format_table(rows, ["row", "step_img_per_s", "step_ratio", "wall_img_per_s", "wall_ratio", "mfu",
                              "peak_mem_gib", "note"]))
    write_json(args.json, {"benchmark": "train", "machine": machine(), "config": args.config,
                           "overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
                           "rows": rows})
    return 0
