"""Guidance masks from class labels alone: 2 × 2 mosaics of training images, the target's cell as its mask.

The Energy loss (``energy_weight``) needs an object mask per image. Where a dataset has none, a
mosaic of ``n × n`` training images of distinct classes, each shrunk to one cell, carries one: the
image keeps its own label and its cell is the mask, so the loss asks the explanation of that class
to fall on that class's image and not on the other classes' images beside it (the grid pointing
game's question, asked of training images). ``GridMosaics`` wraps any labelled image dataset whose
items are ``{"pixel_values", "labels"}`` dicts: with ``probability`` an item becomes a mosaic with
``masks`` its cell; otherwise it is the image with an all-ones mask, which the Energy loss counts as
not annotated. ``mask_cell="other"`` is the control: the same mosaics with the mask on another
class's cell.

Example:
    >>> import torch
    >>> from torch.utils.data import Dataset
    >>> class Toy(Dataset):
    ...     labels = torch.arange(8) % 4
    ...     def __len__(self): return 8
    ...     def __getitem__(self, i): return {"pixel_values": torch.full((3, 8, 8), float(i)), "labels": i % 4}
    >>> mosaics = GridMosaics(Toy(), probability=1.0, seed=0)
    >>> item = mosaics[1]
    >>> item["pixel_values"].shape, item["labels"], int(item["masks"].sum())  # one 4 × 4 cell of 8 × 8
    (torch.Size([3, 8, 8]), 1, 16)
    >>> float(item["pixel_values"][:, item["masks"]].mean())  # the target's own (shrunk) image in its cell
    1.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .data_checks import stored_labels

__all__ = ["MASK_CELLS", "GridMosaics"]

MASK_CELLS = ("own", "other")


class GridMosaics(Dataset):
    """``dataset`` with a share of its items turned into ``n × n`` mosaics whose ``masks`` is the target's cell.

    Args:
        dataset: items ``{"pixel_values": (C, H, W), "labels": int}`` (more keys are dropped);
            its labels are read without decoding (``stored_labels``), and it needs ``n²`` classes.
        probability: the share of items made mosaics (the annotated fraction), in ``(0, 1]``.
        n: cells per side; ``H`` and ``W`` must be divisible by ``n``.
        mask_cell: ``"own"`` (the target's cell) or ``"other"`` (another class's cell: the control).
        seed: the draws (which items, which neighbours, which cell); ``reseed`` is passed on to ``dataset``.
    """

    def __init__(self, dataset: Dataset, probability: float, n: int = 2, mask_cell: str = "own", seed: int = 0) -> None:
        if not 0 < probability <= 1:
            raise ValueError(f"probability={probability}: the share of mosaic items must be in (0, 1].")
        if n < 2:
            raise ValueError(f"n={n}: a mosaic needs at least 2 cells per side.")
        if mask_cell not in MASK_CELLS:
            raise ValueError(f"mask_cell={mask_cell!r}: use one of {MASK_CELLS}.")
        labels = stored_labels(dataset)
        if labels is None:
            raise ValueError(
                "dataset: GridMosaics reads the labels without decoding images (a `labels` tensor, image-folder "
                "`samples` or a 🤗 label column); wrap a dataset that keeps them."
            )
        self.labels = torch.as_tensor([int(label) for label in labels])
        if self.labels.unique().numel() < n * n:
            raise ValueError(f"n={n}: a mosaic needs {n * n} distinct classes, the dataset has fewer.")
        self.dataset, self.probability, self.n, self.mask_cell = dataset, probability, n, mask_cell
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def reseed(self, seed: int) -> None:
        """Reseed the draws here and in the wrapped dataset (its crops and flips) when it has ``reseed``."""
        self.generator.manual_seed(seed)
        if hasattr(self.dataset, "reseed"):
            self.dataset.reseed(seed)

    def _neighbours(self, label: int) -> list[int]:
        """``n² − 1`` random indices whose labels differ from ``label`` and from each other."""
        taken, chosen = {label}, []
        while len(chosen) < self.n * self.n - 1:
            index = int(torch.randint(len(self.labels), (), generator=self.generator))
            if int(self.labels[index]) not in taken:
                taken.add(int(self.labels[index]))
                chosen.append(index)
        return chosen

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        image, label = item["pixel_values"], int(item["labels"])
        height, width = image.shape[-2:]
        if height % self.n or width % self.n:
            raise ValueError(f"n={self.n}: the images ({height} × {width}) must divide into {self.n} cells per side.")
        if float(torch.rand((), generator=self.generator)) >= self.probability:
            return {"pixel_values": image, "labels": label, "masks": torch.ones(height, width, dtype=torch.bool)}
        cells = self.n * self.n
        own = int(torch.randint(cells, (), generator=self.generator))
        images = [self.dataset[i]["pixel_values"] for i in self._neighbours(label)]
        images.insert(own, image)
        mosaic = _mosaic(torch.stack(images), self.n)
        marked = own
        if self.mask_cell == "other":
            marked = (own + 1 + int(torch.randint(cells - 1, (), generator=self.generator))) % cells
        masks = torch.zeros(self.n, self.n, dtype=torch.bool)
        masks.view(-1)[marked] = True
        masks = masks.repeat_interleave(height // self.n, 0).repeat_interleave(width // self.n, 1)
        return {"pixel_values": mosaic, "labels": label, "masks": masks}


def _mosaic(images: Tensor, n: int) -> Tensor:
    """``(n², C, H, W)`` → ``(C, H, W)``: each image shrunk by ``n`` (area average), placed row-major."""
    _, channels, height, width = images.shape
    small = F.interpolate(images.float(), size=(height // n, width // n), mode="area")
    rows = small.view(n, n, channels, height // n, width // n).permute(2, 0, 3, 1, 4)
    return rows.reshape(channels, height, width).to(images.dtype)
