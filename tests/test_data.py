"""Fashion-MNIST: found, verified, read in place; batches match torchvision's pipeline; sharding."""

import gzip
from pathlib import Path

import pytest
import torch
from helpers import real_gz

from nin_dist import data as data_module
from nin_dist.config import DataConfig
from nin_dist.data import (
    FILES,
    TrainBatches,
    eval_batches,
    find_root,
    hold_out,
    load_datasets,
    load_split,
    locate,
    read_idx,
    shard_range,
    to_inputs,
    validation_indices,
)
from nin_dist.errors import DataError
from nin_dist.train import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits(data_root):
    return load_datasets(DataConfig(root=str(data_root)))


def test_real_data_counts_and_first_labels(splits):
    train, test = splits
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert train.images.dtype == torch.uint8
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # PROVENANCE.md


def test_reading_writes_nothing_into_the_root(data_root):
    before = sorted(p.name for p in data_root.rglob("*"))
    load_split(data_root, "test")
    assert sorted(p.name for p in data_root.rglob("*")) == before


def _root_with(tmp_path, data_root, name, payload: bytes | None = None, raw: bytes | None = None) -> Path:
    """A root in torchvision's layout: links to the real files (in whichever layout and form the suite's
    root holds them), one file replaced by a .gz."""
    folder = tmp_path / "root" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for idx in FILES.values():
        src = locate(data_root, idx)
        if idx.name != name:
            (folder / src.name).symlink_to(src)
    target = folder / (name + ".gz")
    target.write_bytes(raw if raw is not None else gzip.compress(payload))
    return tmp_path / "root"


def _idx(name: str):
    return next(idx for idx in FILES.values() if idx.name == name)


def _real(data_root, name) -> bytes:
    return read_idx(locate(data_root, _idx(name)), _idx(name))


def _run(root, capsys):
    code = main(["--config", str(REPO / "configs/cpu.yaml"), f"data.root={root}", "tracking.enabled=false",
                 "train.max_steps=1", "train.progress=false", "run.out_dir=" + str(root.parent / "run")])
    return code, _error_line(capsys.readouterr().err)


def _error_line(stderr: str) -> str:
    """The one error line of a failed run (progress logs may precede it; a traceback may not)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("nin-train: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_truncated_gz_is_one_clear_line(tmp_path, data_root, capsys):
    name = "train-labels-idx1-ubyte"
    gz = real_gz(_idx(name))
    code, err = _run(_root_with(tmp_path, data_root, name, raw=gz[: len(gz) // 2]), capsys)
    assert code == 2
    assert name + ".gz" in err and "truncated or corrupt gzip" in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_wrong_magic_number_is_one_clear_line(tmp_path, data_root, capsys):
    name = "t10k-labels-idx1-ubyte"
    data = bytearray(_real(data_root, name))
    data[3] = 0x03  # 0x00000801 -> 0x00000803
    code, err = _run(_root_with(tmp_path, data_root, name, payload=bytes(data)), capsys)
    assert code == 2
    assert name + ".gz" in err and "wrong IDX magic number 0x00000803 (expected 0x00000801)" in err


def test_changed_byte_is_a_checksum_mismatch(tmp_path, data_root, capsys):
    name = "train-labels-idx1-ubyte"
    data = bytearray(_real(data_root, name))
    data[100] = (data[100] + 1) % 10  # still a valid label: only the checksum can tell
    code, err = _run(_root_with(tmp_path, data_root, name, payload=bytes(data)), capsys)
    assert code == 2
    assert name + ".gz" in err and "checksum mismatch" in err


def test_short_payload_is_truncated(tmp_path, data_root):
    name = "t10k-labels-idx1-ubyte"
    root = _root_with(tmp_path, data_root, name, payload=_real(data_root, name)[:-10])
    with pytest.raises(DataError, match=r"truncated or padded \(9998 bytes, expected 10008\)"):
        load_split(root, "test")


def test_no_data_anywhere_lists_the_places_searched(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NIN_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    # The system location (Debian's dataset-fashion-mnist) pointed at an empty folder: what this
    # machine has installed does not decide what is tested.
    monkeypatch.setattr(data_module, "DEBIAN_ROOT", str(tmp_path / "system"))
    code = main(["--config", str(REPO / "configs/cpu.yaml"), "tracking.enabled=false", "data.download=false"])
    err = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "$NIN_DATA_DIR (unset)" in err and str(tmp_path / "data") in err
    assert str(tmp_path / "system") in err and "apt-get install dataset-fashion-mnist" in err


def test_search_order_and_flat_layout(tmp_path, data_root, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    for idx in FILES.values():  # the four files directly in the root, as Debian ships them
        src = locate(data_root, idx)
        (flat / src.name).symlink_to(src)
    monkeypatch.setenv("NIN_DATA_DIR", str(data_root))
    assert find_root(DataConfig(root=str(flat))) == flat  # data.root first
    assert find_root(DataConfig()) == data_root  # then $NIN_DATA_DIR
    assert len(load_split(flat, "test", limit=5)) == 5
    with pytest.raises(DataError, match="data.root=.*nowhere: Fashion-MNIST not found"):
        find_root(DataConfig(root=str(tmp_path / "nowhere"), download=False))


def test_batches_match_torchvision_resize_224_within_one_level(tmp_path, data_root, splits):
    """The seed's pipeline: FashionMNIST + transforms.Resize(224) + ToTensor, on the same images."""
    from torchvision import datasets, transforms

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for idx in (FILES[("test", "images")], FILES[("test", "labels")]):
        (raw / idx.name).write_bytes(_real(data_root, idx.name))  # torchvision reads uncompressed files
    for idx in (FILES[("train", "images")], FILES[("train", "labels")]):  # it checks for all four
        (raw / idx.name).write_bytes(b"")
    reference = datasets.FashionMNIST(str(tmp_path), train=False, download=False,
                                      transform=transforms.Compose([transforms.Resize(224), transforms.ToTensor()]))
    _, test = splits
    index = torch.tensor([0, 1, 17, 512, 9999])
    ours = to_inputs(test.images[index], DataConfig(resize=224))
    theirs = torch.stack([reference[i][0] for i in index.tolist()])
    assert ours.shape == theirs.shape == (5, 1, 224, 224)
    assert (ours - theirs).abs().max() <= 1 / 255 + 1e-6
    assert [reference[i][1] for i in index.tolist()] == test.labels[index].tolist()


def test_ranks_slice_one_global_permutation(splits):
    train, _ = splits
    cfg = DataConfig(resize=28, flip=True)
    one = list(TrainBatches(train, cfg, 96, rank=0, world_size=1, seed=3).epoch(0))
    parts = [list(TrainBatches(train, cfg, 96, rank=r, world_size=3, seed=3).epoch(0)) for r in range(3)]
    assert len(one) == 625 and all(len(p) == 625 for p in parts)
    for step in (0, 1, 624):
        assert torch.equal(torch.cat([p[step][0] for p in parts]), one[step][0])
        assert torch.equal(torch.cat([p[step][1] for p in parts]), one[step][1])
    other_epoch = next(TrainBatches(train, cfg, 96, 0, 1, seed=3).epoch(1))
    assert not torch.equal(other_epoch[1], one[0][1])
    resumed = next(TrainBatches(train, cfg, 96, 0, 1, seed=3).epoch(0, start_step=1))
    assert torch.equal(resumed[0], one[1][0])


def test_eval_shards_cover_every_image_once():
    for n, world in ((10_000, 3), (7, 4), (5, 1)):
        seen = torch.cat([torch.arange(*shard_range(n, r, world)) for r in range(world)])
        assert torch.equal(seen, torch.arange(n))


def test_eval_batches_over_three_ranks_cover_the_test_set(splits):
    _, test = splits
    cfg = DataConfig(resize=28)
    index = torch.cat([i for r in range(3) for _, _, i in eval_batches(test, cfg, 999, r, 3)])
    assert torch.equal(index.sort().values, torch.arange(10_000))


def test_normalize_uses_the_train_statistics(splits):
    train, _ = splits
    x = to_inputs(train.images[:20_000], DataConfig(resize=28, normalize=True))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


@pytest.mark.parametrize("limit, size", [(None, 6000), (None, 1), (1000, 37), (64, 63)])
def test_the_validation_split_is_stratified_and_disjoint_from_training(splits, limit, size):
    train = splits[0] if limit is None else _first(splits[0], limit)
    fit, val = hold_out(train, size, seed=4)
    held = validation_indices(train.labels, size, seed=4)
    assert len(val) == size and len(fit) == len(train) - size
    kept = torch.tensor(sorted(set(range(len(train))) - set(held.tolist())))
    assert torch.equal(val.images, train.images[held]) and torch.equal(val.labels, train.labels[held])
    assert torch.equal(fit.images, train.images[kept]) and torch.equal(fit.labels, train.labels[kept])
    # Each class holds out its share of `size`, rounded up or down, and the shares add up to `size`.
    share = train.labels.bincount(minlength=10).double() * size / len(train)
    counts = val.labels.bincount(minlength=10).double()
    assert ((counts == share.floor()) | (counts == share.ceil())).all(), (counts, share)
    assert (fit.dataset_name, val.dataset_name) == (f"fashion-mnist-train/train({len(fit)})",
                                                     f"fashion-mnist-train/val({size})")


def _first(split, n):
    return type(split)(split.name, split.images[:n], split.labels[:n], split.files)


def test_the_validation_split_is_fixed_by_the_seed(splits):
    train, _ = splits
    a, b, other = (validation_indices(train.labels, 500, seed) for seed in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert validation_indices(train.labels, 6000, 0).unique().numel() == 6000  # no image twice
    fit, val = hold_out(train, 0, seed=1)
    assert fit is train and val is None
