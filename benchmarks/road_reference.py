"""ROAD's reference noisy linear imputer, for cross-checks and the speed benchmark only.

Copied from ``road/imputations.py`` (``NoisyLinearImputer``) of tleemann/road_evaluation
(MIT License, Copyright (c) 2022 Tobias Leemann), trimmed to the linear imputer and made to
take a generator for its noise. It sets up a scipy sparse system per image and solves it with
``spsolve`` on the CPU. The package's own implementation is
``sd_plugin.evaluation.imputation.noisy_linear_impute``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csc_matrix, lil_matrix
from scipy.sparse.linalg import spsolve

NEIGHBORS_WEIGHTS = [
    ((1, 1), 1 / 12),
    ((0, 1), 1 / 6),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((0, -1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
]


def _add_offset_to_indices(indices, offset, mask_shape):
    cord1 = indices % mask_shape[1]
    cord0 = indices // mask_shape[1]
    cord0 += offset[0]
    cord1 += offset[1]
    invalid = (cord0 < 0) | (cord1 < 0) | (cord0 >= mask_shape[0]) | (cord1 >= mask_shape[1])
    return ~invalid, indices + offset[0] * mask_shape[1] + offset[1]


def _setup_sparse_system(mask, img, neighbors_weights):
    maskflt = mask.flatten()
    imgflat = img.reshape((img.shape[0], -1))
    indices = np.argwhere(maskflt == 0).flatten()
    coords_to_vidx = np.zeros(len(maskflt), dtype=int)
    coords_to_vidx[indices] = np.arange(len(indices))
    num_equations = len(indices)
    A = lil_matrix((num_equations, num_equations))
    b = np.zeros((num_equations, img.shape[0]))
    sum_neighbors = np.ones(num_equations)
    for offset, weight in neighbors_weights:
        valid, new_coords = _add_offset_to_indices(indices, offset, mask.shape)
        valid_coords = new_coords[valid]
        valid_ids = np.argwhere(valid == 1).flatten()
        has_values_coords = valid_coords[maskflt[valid_coords] > 0.5]
        has_values_ids = valid_ids[maskflt[valid_coords] > 0.5]
        b[has_values_ids, :] -= weight * imgflat[:, has_values_coords].T
        has_no_values = valid_coords[maskflt[valid_coords] < 0.5]
        variable_ids = coords_to_vidx[has_no_values]
        has_no_values_ids = valid_ids[maskflt[valid_coords] < 0.5]
        A[has_no_values_ids, variable_ids] = weight
        sum_neighbors[np.argwhere(valid == 0).flatten()] -= weight
    A[np.arange(num_equations), np.arange(num_equations)] = -sum_neighbors
    return A, b


def reference_impute(img: torch.Tensor, mask: torch.Tensor, noise: float = 0.0, generator=None) -> torch.Tensor:
    """One image: ``img`` (C, H, W), ``mask`` (H, W) with 1 = kept, 0 = removed (ROAD's convention)."""
    imgflt = img.reshape(img.shape[0], -1)
    indices_linear = np.argwhere(mask.reshape(-1).numpy() == 0).flatten()
    A, b = _setup_sparse_system(mask.numpy(), img.numpy().astype(np.float64), NEIGHBORS_WEIGHTS)
    res = torch.tensor(spsolve(csc_matrix(A), b), dtype=torch.float64).reshape(len(indices_linear), -1)
    img_infill = imgflt.clone().double()
    draw = torch.randn(res.t().shape, generator=generator, dtype=torch.float64) if noise else 0.0
    img_infill[:, indices_linear] = res.t() + noise * draw
    return img_infill.reshape(img.shape)


def reference_impute_batch(images: torch.Tensor, removed: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """The reference's ``batched_call``: a Python loop of per-image solves. ``removed``: (B, H, W), True = removed."""
    return torch.stack(
        [
            reference_impute(image.cpu(), (~mask).cpu().float(), noise)
            for image, mask in zip(images, removed, strict=True)
        ]
    ).to(images.dtype)
