"""The built-in offline sets: scikit-learn's digits and Debian's Fashion-MNIST IDX files.

Each yields ``{"pixel_values": (1, H, W) float tensor in [-1, 1], "labels": int}``:

- ``"digits"``: scikit-learn's 1,797 8x8 digits, upsampled (16x16 by default), a fixed split;
- ``"fashion-mnist"``: the IDX files of ``dataset-fashion-mnist`` (or ``$FASHION_MNIST_DIR``), 28x28;
- ``"cluttered-digits"``: the demo's ground-truth set (``cluttered_digits``).

Example:
    >>> train, test = load_digits_splits(image_size=16)
    >>> tuple(train[0]["pixel_values"].shape), len(train) + len(test)
    ((1, 16, 16), 1797)
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor_datasets import TensorImageDataset

__all__ = ["BUILTIN_DATASETS", "FASHION_MNIST_DIR", "load_digits_splits", "load_fashion_mnist"]


BUILTIN_DATASETS = ("digits", "cluttered-digits", "fashion-mnist")


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def load_digits_splits(
    image_size: int = 16, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's digits, upsampled to ``image_size``, scaled to [-1, 1]; a fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_count = int(round(test_fraction * len(labels)))
    test, train = order[:test_count], order[test_count:]
    return TensorImageDataset(images[train], labels[train]), TensorImageDataset(images[test], labels[test])


def _read_idx(path: Path) -> Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory / stem}(.gz) not found: install Fashion-MNIST with `apt-get install -y "
        "dataset-fashion-mnist` or set FASHION_MNIST_DIR to a folder with its IDX files."
    )


def load_fashion_mnist(
    split: str = "train", directory: str | Path | None = None, limit: int | None = None
) -> TensorImageDataset:
    """Fashion-MNIST from its IDX files, 1x28x28 scaled to [-1, 1] (``split``: train/test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; use 'train' or 'test'.")
    root = Path(directory or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).long()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = (images.float().unsqueeze(1) / 255.0 - 0.5) / 0.5
    return TensorImageDataset(pixels, labels)
