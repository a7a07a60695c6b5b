"""The seed's own way of doing things (d2l.ai), the baseline every benchmark measures against.

d2l's `load_data_fashion_mnist` builds torchvision's FashionMNIST with `Resize` + `ToTensor` and a
shuffling DataLoader with 4 workers, so every image goes through PIL one at a time; its `net` is a
plain `nn.Sequential` with torch's own layers.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nin_dist.data import IMAGE_SIDE, TRAIN_MEAN, TRAIN_STD, write_torchvision_copy
from nin_dist.layers import CrossRankBatchNorm2d, GlobalBatchDropout


def seed_loader(root: Path, folder: Path, resize: int, batch_size: int, workers: int, normalize: bool = False,
                drop_last: bool = False):
    """The seed's training DataLoader over a torchvision copy of the data written under `folder`."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    write_torchvision_copy(root, folder)
    steps = [transforms.Resize(resize)] if resize != IMAGE_SIDE else []
    steps.append(transforms.ToTensor())
    if normalize:
        steps.append(transforms.Normalize((TRAIN_MEAN,), (TRAIN_STD,)))
    dataset = datasets.FashionMNIST(str(folder), train=True, download=False, transform=transforms.Compose(steps))
    return DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, drop_last=drop_last,
                      persistent_workers=workers > 0)


def plain_sequential(model: nn.Sequential) -> nn.Sequential:
    """The same layers as a plain nn.Sequential with torch's own BatchNorm2d and Dropout (the seed's)."""
    def plain(m: nn.Module) -> nn.Module:
        if isinstance(m, CrossRankBatchNorm2d):
            return nn.BatchNorm2d(m.num_features)
        if isinstance(m, GlobalBatchDropout):
            return nn.Dropout(m.p)
        if isinstance(m, nn.Sequential):
            return nn.Sequential(*(plain(c) for c in m))
        return m

    return nn.Sequential(*(plain(m) for m in model))
