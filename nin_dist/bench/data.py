"""Batch pipeline speed: our device-resident batches vs the seed's torchvision DataLoader.

The seed's pipeline (`nin_dist.bench.seed`) sends every image through PIL one at a time. Ours
gathers a whole batch from one uint8 tensor and scales and resizes it in one batched call. Both
produce float [B, 1, 224, 224] batches in [0, 1]. Ours is timed twice: as it is, and with the
training augmentation (translate, flip and erasing: `nin_dist.augment`), which the seed's has none of.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from nin_dist.bench.common import format_table, machine, median_of_repeats, write_json
from nin_dist.bench.seed import seed_loader
from nin_dist.config import DataConfig
from nin_dist.data import Split, TrainBatches, find_root, load_split


def add_arguments(p) -> None:
    p.add_argument("--resize", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="timed batches per pipeline")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for the seed's pipeline (d2l: 4)")
    p.add_argument("--root", default=None, help="data root (default: the usual search)")
    p.add_argument("--translate", type=int, default=2, help="data.translate of the augmented row, pixels")
    p.add_argument("--erase", type=float, default=0.5, help="data.erase of the augmented row, probability")
    p.add_argument("--repeats", type=int, default=1, help="runs of the three pipelines, interleaved; the median "
                                                          "of each row (its ratio to the seed's of the same run)")


def _time(batches, count: int, warmup: int = 2) -> float:
    """Seconds for `count` batches after `warmup` untimed ones; each batch is touched (summed)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)[0].sum()
    t0 = time.perf_counter()
    for _ in range(count):
        next(it)[0].sum()
    return time.perf_counter() - t0


def _ours(train: Split, cfg: DataConfig, args) -> float:
    return _time(TrainBatches(train, cfg, args.batch_size, 0, 1, seed=0).epoch(0), args.batches)


def _seed_pipeline(root: Path, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return _time(seed_loader(root, Path(tmp), args.resize, args.batch_size, args.workers), args.batches)


def _one_repeat(root: Path, train: Split, args) -> list[dict]:
    """The three pipelines timed once, each ratio against this repeat's seed pipeline."""
    plain = DataConfig(resize=args.resize)
    augmented = DataConfig(resize=args.resize, augment=True, flip=True, translate=args.translate, erase=args.erase)
    timed = {f"seed: torchvision Resize+ToTensor, DataLoader({args.workers} workers)": _seed_pipeline(root, args),
             "ours: device-resident uint8, batched resize": _ours(train, plain, args),
             f"ours + augmentation (translate {args.translate}, flip, erase {args.erase:g})":
                 _ours(train, augmented, args)}
    seed_s = next(iter(timed.values()))
    images = args.batches * args.batch_size
    return [{"pipeline": name, "seconds": seconds, "img_per_s": images / seconds, "ratio": seed_s / seconds}
            for name, seconds in timed.items()]


def run(args) -> int:
    root = Path(args.root) if args.root else find_root(DataConfig())
    train = load_split(root, "train")
    repeats = [_one_repeat(root, train, args) for _ in range(args.repeats)]
    rows = [median_of_repeats([repeat[i] for repeat in repeats]) for i in range(len(repeats[0]))]
    print(f"batch pipeline at resize {args.resize}, batch {args.batch_size}, {args.batches} batches, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(format_table(rows, ["pipeline", "seconds", "img_per_s", "ratio"]))
    write_json(args.json, {"benchmark": "data", "machine": machine(), "args": vars(args), "rows": rows})
    return 0
