"""Data sets as whole tensors, read from the original files (never downloaded).

* MNIST: the four original `MNIST/raw/*.gz` files, parsed directly into tensors once and
  normalized as `ToTensor()` + `Normalize((0.1307,), (0.3081,))` would.
* CIFAR-10: `cifar-10-batches-py`, normalized with the usual per-channel mean and std; training
  batches get a random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip
  ([`augment_batch`][]).

Both keep the last `VAL_SIZE` = 5,000 training images as a validation split.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DEFAULT_DATA_ROOT",
    "VAL_SIZE",
    "Data",
    "Split",
    "augment_batch",
    "load_data",
]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
VAL_SIZE = 5000


@dataclass
class Split:
    """Images ``x`` (float32, normalized, NCHW) and labels ``y`` (int64) of one split."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def head(self, n: int) -> Split:
        return Split(self.x[:n], self.y[:n])

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    """Train (without the validation images), validation and test splits of one data set."""

    name: str
    train: Split
    val: Split
    test: Split
    augment: bool = False


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped: big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(root: Path) -> Data:
    """MNIST from ``root/MNIST/raw/*.gz``; pixels as ``ToTensor()`` then ``Normalize(0.1307, 0.3081)``."""
    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raise FileNotFoundError(f"MNIST not found: {raw} does not exist; pass --data-root pointing at it.")

    def split(prefix: str) -> Split:
        images = torch.from_numpy(_read_idx(raw / f"{prefix}-images-idx3-ubyte.gz").copy())
        labels = torch.from_numpy(_read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        x = (images.float().div_(255.0).sub_(0.1307).div_(0.3081)).unsqueeze(1)
        return Split(x.contiguous(), labels)

    train, test = split("train"), split("t10k")
    n = len(train) - VAL_SIZE
    return Data(
        "mnist", Split(train.x[:n], train.y[:n]), Split(train.x[n:], train.y[n:]), test, augment=False
    )


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(root: Path) -> Data:
    """CIFAR-10 from ``root/cifar-10-batches-py``, normalized per channel; training batches augmented."""
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder} does not exist; pass --data-root pointing at it."
        )

    def read(names: Sequence[str]) -> Split:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        return Split(((x - mean) / std).contiguous(), torch.from_numpy(np.concatenate(ys)))

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    n = len(train) - VAL_SIZE
    return Data(
        "cifar10", Split(train.x[:n], train.y[:n]), Split(train.x[n:], train.y[n:]), test, augment=True
    )


def load_data(name: str, root: Path, limit: int | None = None) -> Data:
    """The data set ``name`` (``"mnist"`` or ``"cifar10"``); ``limit`` truncates every split (smoke tests)."""
    data = load_mnist(root) if name == "mnist" else load_cifar10(root)
    if limit is not None:
        data = replace(
            data, train=data.train.head(limit), val=data.val.head(limit), test=data.test.head(limit)
        )
    return data


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded images and random horizontal flip, per image.

    The padding is 0 in normalized units, i.e. the data set's mean colour (torchvision pads the raw
    image with black before normalizing; the difference is immaterial for the recipe).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]
