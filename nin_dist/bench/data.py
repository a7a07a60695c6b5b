"""Batch pipeline speed: our device-resident batches vs the seed's torchvision DataLoader.

The seed's pipeline (`nin_dist.bench.seed`) sends every image through PIL one at a time. Ours
gathers a whole batch from one uint8 tensor and scales and resizes it in one batched call. Both
produce float [B, 1, 224, 224] batches in [0, 1].
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from nin_dist.bench.common import format_table, machine, write_json
from nin_dist.bench.seed import seed_loader
from nin_dist.config import DataConfig
from nin_dist.data import TrainBatches, find_root, load_split


def add_arguments(p) -> None:
    p.add_argument("--resize", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="timed batches per pipeline")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for the seed's pipeline (d2l: 4)")
    p.add_argument("--root", default=None, help="data root (default: the usual search)")


def _time(batches, count: int, warmup: int = 2) -> float:
    """Seconds for `count` batches after `warmup` untimed ones; each batch is touched (summed)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)[0].sum()
    t0 = time.perf_counter()
    for _ in range(count):
        next(it)[0].sum()
    return time.perf_counter() - t0


def _ours(root: Path, args) -> float:
    train = load_split(root, "train")
    cfg = DataConfig(resize=args.resize)
    return _time(TrainBatches(train, cfg, args.batch_size, 0, 1, seed=0).epoch(0), args.batches)


def _seed_pipeline(root: Path, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return _time(seed_loader(root, Path(tmp), args.resize, args.batch_size, args.workers), args.batches)


def run(args) -> int:
    root = Path(args.root) if args.root else find_root(DataConfig())
    images = args.batches * args.batch_size
    seed_s = _seed_pipeline(root, args)
    ours_s = _ours(root, args)
    rows = [
        {"pipeline": f"seed: torchvision Resize+ToTensor, DataLoader({args.workers} workers)",
         "seconds": seed_s, "img_per_s": images / seed_s, "ratio": 1.0},
        {"pipeline": "ours: device-resident uint8, batched resize", "seconds": ours_s,
         "img_per_s": images / ours_s, "ratio": seed_s / ours_s},
    ]
    print(f"batch pipeline at resize {args.resize}, batch {args.batch_size}, {args.batches} batches, "
          f"{torch.get_num_threads()} threads")
    print(format_table(rows, ["pipeline", "seconds", "img_per_s", "ratio"]))
    write_json(args.json, {"benchmark": "data", "machine": machine(), "args": vars(args), "rows": rows})
    return 0
