"""ROAD's linear system solved by a sparse direct factorization, for the benchmark's comparison only.

The alternative to multigrid that issue 29 names: per image, the system over the removed pixels is
assembled in one vectorised pass (no per-entry Python loop, unlike the reference) and factorised
once by SuperLU (``scipy.sparse.linalg.splu``), the factorization then serving all channels.
"""

from __future__ import annotations

import numpy as np
import torch
from road_reference import NEIGHBORS_WEIGHTS
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import splu


def direct_impute(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """One image ``(C, H, W)`` with ``removed`` ``(H, W)`` True where imputed; noise off."""
    values = image.double().numpy()
    mask = removed.numpy()
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return image.clone()
    number = -np.ones((height, width), dtype=np.int64)
    number[ys, xs] = np.arange(len(ys))
    diagonal = np.zeros(len(ys))
    rhs = np.zeros((len(ys), values.shape[0]))
    rows, cols, data = [], [], []
    for (dy, dx), weight in NEIGHBORS_WEIGHTS:
        y, x = ys + dy, xs + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        diagonal[inside] += weight
        yi, xi, own = y[inside], x[inside], np.nonzero(inside)[0]
        unknown = mask[yi, xi]
        rows.append(own[unknown])
        cols.append(number[yi[unknown], xi[unknown]])
        data.append(np.full(int(unknown.sum()), -weight))
        rhs[own[~unknown]] += weight * values[:, yi[~unknown], xi[~unknown]].T
    rows.append(np.arange(len(ys)))
    cols.append(np.arange(len(ys)))
    data.append(diagonal)
    matrix = csc_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(len(ys),) * 2)
    solution = splu(matrix).solve(rhs)
    out = values.copy()
    out[:, ys, xs] = solution.T
    return torch.from_numpy(out).to(image.dtype)


def direct_impute_batch(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """A Python loop of per-image factorizations, like the reference's ``batched_call``."""
    return torch.stack([direct_impute(image, mask) for image, mask in zip(images, removed, strict=True)])
