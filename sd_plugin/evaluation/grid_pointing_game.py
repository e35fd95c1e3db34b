"""The grid pointing game (GridPG; Böhle et al. CVPR 2022, TPAMI 2024): ground truth from class labels alone.

An ``n × n`` grid of test images of ``n²`` distinct classes, each cell at the model's input size,
goes through the model whole; the explanation of each cell's class should fall in that cell. The
score of a (grid, cell) is the share of the explanation's *positive* attribution that lies in the
cell (0 when it has none); chance is ``1 / n²``. The grids are drawn once from a seed
(``make_grids``), so every model is scored on the same grids and cells (paired comparisons).

Scores are reported over all cells and over the cells whose image *alone* the model classifies
correctly (the published protocol keeps confidently classified images: ``min_confidence``). The
disconnected variant (Rao et al. CVPR 2022, "DiFull") explains each cell image separately for the
target class and places the maps side by side: no cell can draw on another through the receptive
field, so a method that scores by the receptive field's reach alone is exposed.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(8, 1, 4, 4), torch.arange(8) % 4)
    >>> grids = make_grids([int(y) for _, y in data], count=3, n=2, seed=0)
    >>> grids.indices.shape, grids.labels.unique().numel() == 4
    (torch.Size([3, 4]), True)
    >>> compose_grid(torch.stack([data[i][0] for i in grids.indices[0].tolist()]), 2).shape
    torch.Size([1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..storage.data_checks import stored_labels
from ..utils.batches import unpack_batch
from .attribution import Attribution, attribution_name, saliency_maps
from .model_fn import evaluation_mode, prepare_for_evaluation
from .report import first_images

__all__ = [
    "GridPointingGame",
    "Grids",
    "cell_shares",
    "compose_grid",
    "dataset_labels",
    "grid_pointing_game",
    "make_grids",
]


@dataclass(frozen=True)
class Grids:
    """``count`` grids: dataset ``indices`` and ``labels``, ``(count, n²)`` in row-major cell order."""

    indices: Tensor
    labels: Tensor
    n: int
    seed: int


def make_grids(labels: Sequence[int] | Tensor, count: int, n: int = 2, seed: int = 0) -> Grids:
    """``count`` grids of ``n²`` images of distinct classes drawn from ``labels`` (a dataset's, in order).

    Each grid draws ``n²`` classes uniformly among those present, then one image of each; the same
    ``labels`` and ``seed`` give the same grids (whatever model is scored on them).
    """
    if n < 2:
        raise ValueError(f"n={n}: a grid needs at least 2 x 2 cells.")
    if count < 1:
        raise ValueError(f"count={count} must be >= 1.")
    labels = torch.as_tensor(labels, dtype=torch.long)
    classes = labels.unique()
    if classes.numel() < n * n:
        raise ValueError(
            f"a {n}x{n} grid needs {n * n} distinct classes but the dataset has {classes.numel()}; use a smaller n."
        )
    members = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    generator = torch.Generator().manual_seed(seed)
    indices = torch.empty(count, n * n, dtype=torch.long)
    for g in range(count):
        chosen = classes[torch.randperm(classes.numel(), generator=generator)[: n * n]]
        for k, c in enumerate(chosen.tolist()):
            pool = members[c]
            indices[g, k] = pool[torch.randint(pool.numel(), (1,), generator=generator)]
    return Grids(indices, labels[indices], n, seed)


def dataset_labels(dataset: Dataset, batch_size: int = 256) -> list[int]:
    """Every label of ``dataset`` in order: read apart from the images where the dataset keeps them
    (``storage.data_checks.stored_labels``), else by one pass of a loader."""
    labels = stored_labels(dataset)
    if labels is None:
        labels = torch.cat([unpack_batch(batch)[1] for batch in DataLoader(dataset, batch_size=batch_size)]).tolist()
    return [int(label) for label in labels]


def compose_grid(cells: Tensor, n: int) -> Tensor:
    """``(n², C, H, W)`` cell images -> one ``(C, nH, nW)`` image, row-major."""
    channels, height, width = cells.shape[1:]
    rows = cells.view(n, n, channels, height, width).permute(2, 0, 3, 1, 4)
    return rows.reshape(channels, n * height, n * width)


def cell_shares(maps: Tensor, n: int) -> Tensor:
    """``(B, nH, nW)`` maps -> ``(B, n²)``: each cell's share of the map's positive part (0 where it has none).

    Example:
        >>> maps = torch.zeros(1, 4, 4); maps[0, :2, 2:] = 1.0; maps[0, 3, 0] = 1.0; maps[0, 3, 3] = -9.0
        >>> cell_shares(maps, 2).tolist()
        [[0.0, 0.8, 0.2, 0.0]]
    """
    batch, height, width = maps.shape
    positive = maps.double().clamp_min(0)
    cells = positive.view(batch, n, height // n, n, width // n).sum(dim=(2, 4)).reshape(batch, n * n)
    total = cells.sum(1, keepdim=True)
    return torch.where(total > 0, cells / total.clamp_min(1e-300), torch.zeros_like(cells))


@dataclass
class GridPointingGame:
    """Per-(grid, cell) scores, whether each cell's image alone is classified correctly, and their means."""

    scores: Tensor  # (grids, n²): share of the target's explanation in its own cell
    correct: Tensor  # (grids, n²): the cell's image alone classified correctly (and confidently enough)
    n: int
    attribution: str
    disconnected: bool

    @property
    def chance(self) -> float:
        return 1.0 / (self.n * self.n)

    def mean(self, only_correct: bool = False) -> float:
        values = self.scores[self.correct] if only_correct else self.scores.flatten()
        return float(values.mean()) if values.numel() else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "attribution": self.attribution,
            "disconnected": self.disconnected,
            "chance": self.chance,
            "mean": self.mean(),
            "mean_correct": self.mean(only_correct=True),
            "cells_correct": int(self.correct.sum()),
            "cells": int(self.correct.numel()),
            "scores": self.scores.tolist(),
            "correct": self.correct.tolist(),
        }


@torch.no_grad()
def grid_pointing_game(
    model: nn.Module,
    dataset: Dataset,
    grids: Grids,
    attribution: Attribution = "gradient",
    grids_per_batch: int = 4,
    disconnected: bool = False,
    min_confidence: float = 0.0,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> GridPointingGame:
    """Score ``attribution`` of ``model`` on ``grids`` of ``dataset``'s images (see the module docstring).

    ``min_confidence``: a cell counts as correctly classified only if its image alone gets its
    label with at least this probability (0: any correct prediction).
    """
    n, cells = grids.n, grids.n * grids.n
    scores = torch.zeros(grids.indices.shape, dtype=torch.float64)
    correct = torch.zeros(grids.indices.shape, dtype=torch.bool)
    with evaluation_mode(model):
        forward, device, generator = prepare_for_evaluation(model, device, seed)
        for start in range(0, grids.indices.shape[0], grids_per_batch):
            block = range(start, min(start + grids_per_batch, grids.indices.shape[0]))
            cells_of = [Subset(dataset, grids.indices[g].tolist()) for g in block]
            images = torch.stack([first_images(c, cells)[0] for c in cells_of]).to(device)
            labels = grids.labels[list(block)].to(device)  # (g, n²)
            flat_images, flat_labels = images.flatten(0, 1), labels.flatten()
            probabilities = forward(flat_images).float().softmax(-1)
            picked = probabilities.gather(1, flat_labels.view(-1, 1))[:, 0]
            hit = (probabilities.argmax(-1) == flat_labels) & (picked >= min_confidence)
            correct[list(block)] = hit.view(len(block), cells).cpu()
            if disconnected:
                # each cell image explained alone for every target of its grid, the maps placed side by side
                targets = labels.repeat_interleave(cells, dim=1).flatten()  # (g * n² * n²,) target of each map
                repeated = flat_images.repeat_interleave(cells, dim=0).view(len(block), cells, cells, *images.shape[2:])
                repeated = repeated.transpose(1, 2).flatten(0, 2)  # (grid, target, cell) order
                with torch.enable_grad():
                    maps = saliency_maps(model, repeated, targets, attribution, generator)
                maps = maps.view(len(block) * cells, cells, *maps.shape[1:])
                maps = torch.stack([compose_grid(m.unsqueeze(1), n)[0] for m in maps])
            else:
                grid_images = torch.stack([compose_grid(cells_of_grid, n) for cells_of_grid in images])
                batch = grid_images.repeat_interleave(cells, dim=0)  # each grid once per target cell
                with torch.enable_grad():
                    maps = saliency_maps(model, batch, labels.flatten(), attribution, generator)
            shares = cell_shares(maps.float(), n).view(len(block), cells, cells)  # (grid, target, cell)
            scores[list(block)] = torch.diagonal(shares, dim1=1, dim2=2).cpu()
    return GridPointingGame(scores, correct, n, attribution_name(attribution), disconnected)
