"""Fashion-MNIST: find it, verify it, hold each split on the training device, batch it there.

Where the data is: `data.root` when set (downloaded there if missing); else the first of `$NIN_DATA_DIR`,
`./data` and `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`) that holds the
files; else a download into `./data`. Downloads come from `data.mirror` (default: torchvision's mirror,
then upstream's) and `data.download=false` turns them off (`nin_dist.download`). A root holds
`FashionMNIST/raw/*-ubyte.gz` (torchvision's layout) or the four files directly, compressed or not.
The `.gz` files are read in place and nothing but a download is ever written into a root (it may be
read-only). Every file is verified: gzip integrity, size, IDX magic number, dimensions and the
SHA-256 of the uncompressed bytes.

A split lives on the device as one uint8 tensor (60,000 x 28 x 28 = 47 MB). Each batch is gathered,
scaled to [0, 1], optionally augmented (`nin_dist.augment`), flipped and normalised, and resized on
that device in batched calls. Ranks share one permutation per (seed, epoch): each takes its slice of
every global batch. `data.val_size` images of the training split, stratified by class and chosen by
the seed, are held out as a validation split (`hold_out`) before any batch is made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nin_dist import augment
from nin_dist.config import DataConfig
from nin_dist.download import DEBIAN_HINT, DEFAULT_MIRRORS, download, raw_folder
from nin_dist.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SIDE = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean / std of the training pixels scaled to [0, 1] (the dataset's PROVENANCE.md: 0.2860 / 0.3530).
TRAIN_MEAN, TRAIN_STD = 0.2860, 0.3530
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class IdxFile:
    name: str  # uncompressed file name, as upstream
    magic: int
    count: int
    sha256: str  # of the uncompressed bytes (upstream files; torchvision checks the same bytes by MD5)


FILES = {
    ("train", "images"): IdxFile("train-images-idx3-ubyte", IDX_IMAGES_MAGIC, 60_000,
                                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train", "labels"): IdxFile("train-labels-idx1-ubyte", IDX_LABELS_MAGIC, 60_000,
                                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("test", "images"): IdxFile("t10k-images-idx3-ubyte", IDX_IMAGES_MAGIC, 10_000,
                                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("test", "labels"): IdxFile("t10k-labels-idx1-ubyte", IDX_LABELS_MAGIC, 10_000,
                                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


# --------------------------------------------------------------------------- finding the files

def locate(root: Path, idx: IdxFile) -> Path | None:
    """Where `root` holds `idx`: under FashionMNIST/raw or directly, compressed or not; None if nowhere."""
    for folder in (root / "FashionMNIST" / "raw", root):
        for name in (idx.name + ".gz", idx.name):
            if (folder / name).is_file():
                return folder / name
    return None


def _holds_dataset(root: Path) -> bool:
    return all(locate(root, idx) is not None for idx in FILES.values())


def _missing(root: Path) -> list[IdxFile]:
    return [idx for idx in FILES.values() if locate(root, idx) is None]


def find_root(cfg: DataConfig) -> Path:
    """data.root, else the first place that holds all four files, else a download into ./data; or DataError."""
    if cfg.root is not None:  # the one place named: found there, downloaded there, or an error
        root = Path(cfg.root).expanduser()
        if not _holds_dataset(root) and not cfg.download:
            missing = [idx.name for idx in _missing(root)]
            raise DataError(f"data.root={root}: Fashion-MNIST not found there (missing {', '.join(missing)}; "
                            f"expected FashionMNIST/raw/*-ubyte.gz or the files directly; or data.download=true)")
        return root if _holds_dataset(root) else _download(root, cfg)
    candidates = [Path(p).expanduser() for p in (os.environ.get("NIN_DATA_DIR"), "data", DEBIAN_ROOT) if p]
    for root in candidates:
        if _holds_dataset(root):
            return root
    if cfg.download:
        return _download(Path("data"), cfg)
    searched = [
        f"$NIN_DATA_DIR={os.environ['NIN_DATA_DIR']}" if os.environ.get("NIN_DATA_DIR") else "$NIN_DATA_DIR (unset)",
        str(Path("data").resolve()), DEBIAN_ROOT]
    raise DataError("Fashion-MNIST not found; searched " + ", ".join(searched) +
                    f"; set data.root or NIN_DATA_DIR, or data.download=true; {DEBIAN_HINT}")


def _download(root: Path, cfg: DataConfig) -> Path:
    log.info("data: no copy of Fashion-MNIST found; downloading into %s", raw_folder(root).resolve())
    download(root, lambda: _missing(root), (cfg.mirror,) if cfg.mirror else DEFAULT_MIRRORS, read_idx)
    return root


# --------------------------------------------------------------------------- reading and verifying

def _gunzip(raw: bytes, expected_size: int) -> bytes:
    """One gzip member, decompressed to at most one byte past `expected_size`: a file that would
    inflate far beyond the dataset (a gzip bomb from a hostile mirror) stops there, not in MemoryError."""
    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    data = stream.decompress(raw, expected_size + 1)
    if len(data) <= expected_size and not stream.eof:
        raise EOFError("the compressed stream ends early")
    if stream.unused_data:
        raise zlib.error("data after the end of the compressed stream")
    return data


def read_idx(path: Path, idx: IdxFile) -> bytes:
    """The verified uncompressed bytes of one IDX file, or DataError naming the file and problem."""
    header = 16 if idx.magic == IDX_IMAGES_MAGIC else 8
    expected_size = header + idx.count * (IMAGE_SIDE * IMAGE_SIDE if idx.magic == IDX_IMAGES_MAGIC else 1)
    try:
        raw = path.read_bytes()
        data = _gunzip(raw, expected_size) if path.suffix == ".gz" else raw
    except (EOFError, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt gzip ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if len(data) < 8:
        raise DataError(f"{path}: truncated ({len(data)} bytes, expected {expected_size})")
    magic, count = struct.unpack(">II", data[:8])
    if magic != idx.magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x} (expected 0x{idx.magic:08x})")
    if count != idx.count:
        raise DataError(f"{path}: holds {count} items, expected {idx.count}")
    if idx.magic == IDX_IMAGES_MAGIC and len(data) >= 16:
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    if len(data) != expected_size:
        raise DataError(f"{path}: truncated or padded ({len(data)} bytes, expected {expected_size})")
    digest = hashlib.sha256(data).hexdigest()
    if digest != idx.sha256:
        raise DataError(f"{path}: checksum mismatch (SHA-256 {digest[:16]}..., expected {idx.sha256[:16]}...)")
    return data


@dataclass
class Split:
    """One split in memory: uint8 images [N, 28, 28], int64 labels [N], and where they came from."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    files: tuple[Path, Path]
    part: str | None = None  # a part of the split that is not its first N images: "train" or "val" of hold_out

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def digest(self) -> str:
        """The upstream SHA-256 pair of this split's files (identifies the data, not the limit)."""
        return hashlib.sha256((FILES[(self.name, "images")].sha256 + FILES[(self.name, "labels")].sha256)
                              .encode()).hexdigest()[:16]

    @property
    def dataset_name(self) -> str:
        """`fashion-mnist-test`, or `fashion-mnist-test[:50]` for the first 50 images only."""
        full = FILES[(self.name, "images")].count
        if self.part is not None:  # e.g. fashion-mnist-train/val(5000): held out, not a prefix
            return f"fashion-mnist-{self.name}/{self.part}({len(self)})"
        return f"fashion-mnist-{self.name}" + ("" if len(self) == full else f"[:{len(self)}]")

    def to(self, device: torch.device) -> Split:
        return Split(self.name, self.images.to(device), self.labels.to(device), self.files, self.part)


def load_split(root: Path, split: str, limit: int | None = None) -> Split:
    paths = []
    tensors = []
    for kind in ("images", "labels"):
        idx = FILES[(split, kind)]
        path = locate(root, idx)
        if path is None:
            raise DataError(f"{root}: {idx.name}(.gz) not found")
        data = read_idx(path, idx)
        header = 16 if kind == "images" else 8
        flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
        tensors.append(flat.view(-1, IMAGE_SIDE, IMAGE_SIDE) if kind == "images" else flat.long())
        paths.append(path)
    images, labels = tensors
    if limit is not None:
        images, labels = images[:limit].clone(), labels[:limit].clone()
    return Split(split, images, labels, tuple(paths))


def write_torchvision_copy(root: Path, folder: Path) -> None:
    """Uncompressed copies of the four files under folder/FashionMNIST/raw, where torchvision's
    FashionMNIST reads them (it does not read .gz in place); the root itself is left untouched."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for idx in FILES.values():
        (raw / idx.name).write_bytes(read_idx(locate(root, idx), idx))


def load_datasets(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, test) on the CPU, verified, with the configured limits."""
    root = find_root(cfg)
    splits = load_split(root, "train", cfg.train_limit), load_split(root, "test", cfg.test_limit)
    source = " (Debian's dataset-fashion-mnist)" if root == Path(DEBIAN_ROOT) else ""
    log.info("data: Fashion-MNIST from %s%s, verified", root.resolve(), source)
    return splits


def validation_indices(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of `size` images stratified by class, chosen by `seed`.

    Class c of n_c images (of n) gets floor(size * n_c / n) places, and the places left go one each
    to the classes with the largest remainders (the lower class first on a tie): integer arithmetic,
    the same on every rank and machine. Which images of a class are held out is a permutation drawn
    from a generator of the seed alone."""
    labels = labels.cpu()
    counts = labels.bincount(minlength=len(CLASSES)).tolist()
    quota = [size * n // len(labels) for n in counts]
    remainders = sorted(range(len(counts)), key=lambda c: (-(size * counts[c] % len(labels)), c))
    for c in remainders[: size - sum(quota)]:
        quota[c] += 1
    gen = torch.Generator().manual_seed((seed * 0x2545F491 + 0x5851F42D) % 2**63)  # apart from the other streams
    chosen = []
    for c, count in enumerate(quota):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:count]])
    return torch.cat(chosen).sort().values


def hold_out(split: Split, size: int, seed: int) -> tuple[Split, Split | None]:
    """(the images trained on, the `size` held out for validation); (split, None) when size is 0."""
    if size == 0:
        return split, None
    held = validation_indices(split.labels, size, seed)
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().flatten()

    def part(index: torch.Tensor, name: str) -> Split:
        return Split(split.name, split.images[index], split.labels[index], split.files, name)

    digest = hashlib.sha256(held.numpy().tobytes()).hexdigest()[:16]
    log.info("data: %d training images held out for validation (stratified by class, seed %d; indices %s)",
             size, seed, digest)
    return part(kept, "train"), part(held, "val")


# --------------------------------------------------------------------------- batches on the device

def to_inputs(images: torch.Tensor, cfg: DataConfig, flip: torch.Tensor | None = None,
              draws: augment.Draws | None = None) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, R, R] on the same device: scale, augment, flip, normalise, resize.

    Everything but the resize works on the 28 x 28 images: flipping and the per-pixel affine commute
    with a bilinear resize whose weights sum to one, so they cost 1/64 of the work at R = 224.
    """
    if draws is not None:  # on the uint8 pixels: a quarter of the bytes, and 0 stays 0 once scaled
        images = augment.apply(images, draws, cfg)
    x = images.float().div_(255.0)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1), x.flip(-1), x)
    if cfg.normalize:
        x = (x - TRAIN_MEAN) / TRAIN_STD
    x = x.unsqueeze(1)
    if cfg.resize != IMAGE_SIDE:
        # Bilinear with antialias when shrinking: torchvision's Resize on a PIL image (the seed's).
        x = F.interpolate(x, size=(cfg.resize, cfg.resize), mode="bilinear", align_corners=False,
                          antialias=cfg.resize < IMAGE_SIDE)
    return x


def epoch_order(n: int, seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's permutation: a function of (seed, epoch) only, same on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # torch takes seeds < 2**64


class TrainBatches:
    """Per-rank slices of each global batch of one epoch's shared permutation.

    The last partial global batch is dropped so every step has the full global batch and every rank
    the same share; that keeps N processes computing the same update as one.
    """

    def __init__(self, split: Split, cfg: DataConfig, global_batch: int, rank: int, world_size: int,
                 seed: int):
        # The trainer checks this before loading anything (a ConfigError naming train.batch_size).
        assert global_batch % world_size == 0, f"global batch {global_batch} over {world_size} ranks"
        if global_batch > len(split):
            raise DataError(f"train.batch_size={global_batch} is larger than the {len(split)} training images")
        self.split, self.cfg, self.seed = split, cfg, seed
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.rank = rank
        self.steps_per_epoch = len(split) // global_batch

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (inputs, labels) for steps start_step.. of `epoch` (start_step > 0 on a resume)."""
        gen = epoch_order(len(self.split), self.seed, epoch)
        order = torch.randperm(len(self.split), generator=gen)
        flips = torch.rand(len(self.split), generator=gen) < 0.5 if self.cfg.flip else None
        device = self.split.images.device
        order = order.to(device)
        flips = flips.to(device) if flips is not None else None
        draws = augment.draw(self.cfg, len(self.split), IMAGE_SIDE, self.seed, epoch, device) \
            if self.cfg.augment else None
        for step in range(start_step, self.steps_per_epoch):
            lo = step * self.global_batch + self.rank * self.local_batch
            idx = order[lo: lo + self.local_batch]
            flip = flips[lo: lo + self.local_batch] if flips is not None else None
            rows = draws.rows(lo, lo + self.local_batch) if draws is not None else None
            yield to_inputs(self.split.images[idx], self.cfg, flip, rows), self.split.labels[idx]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of n items for one rank; the shards cover 0..n exactly once."""
    return n * rank // world_size, n * (rank + 1) // world_size


def eval_batches(split: Split, cfg: DataConfig, global_batch: int, rank: int, world_size: int):
    """This rank's shard of the split, in order, as (inputs, labels, indices) batches."""
    start, stop = shard_range(len(split), rank, world_size)
    local = max(1, global_batch // world_size)
    for lo in range(start, stop, local):
        hi = min(lo + local, stop)
        yield to_inputs(split.images[lo:hi], cfg), split.labels[lo:hi], torch.arange(lo, hi)
