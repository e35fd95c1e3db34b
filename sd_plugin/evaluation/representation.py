"""Feature effective rank ``exp(H(lambda / sum(lambda)))`` (the paper's dimensional collapse).

Example:
    >>> import torch
    >>> round(float(effective_rank(torch.randn(4096, 8))), 1)
    8.0
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_rank"]


def effective_rank(features: Tensor) -> Tensor:
    """Effective rank of the covariance of ``(N, D)`` features, in ``[1, D]`` (float64).

    ``D`` for white features, ``1`` for rank-one features.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"expected (N >= 2, D) features, got shape {tuple(features.shape)}.")
    f = features.detach().double()
    centred = f - f.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / (f.shape[0] - 1)).clamp_min(0.0)
    total = eigenvalues.sum()
    if total <= 0:
        return torch.tensor(1.0, dtype=torch.float64)
    p = eigenvalues / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return entropy.exp()
