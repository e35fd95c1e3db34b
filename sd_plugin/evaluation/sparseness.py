"""Saliency sparseness: the Gini coefficient of ``|saliency|`` per image.

Normalised so that a constant map scores 0 and a one-hot map scores 1 (the sample
Gini of Chalasani et al. / Quantus ``Sparseness`` times ``n / (n - 1)``).

Example:
    >>> import torch
    >>> one_hot = torch.zeros(1, 4, 4); one_hot[0, 1, 2] = 3.0
    >>> sparseness(torch.cat([one_hot, torch.ones(1, 4, 4)])).tolist()
    [1.0, 0.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sparseness"]


def sparseness(saliency: Tensor) -> Tensor:
    """Gini coefficient per map: ``(B, ...) -> (B,)`` in ``[0, 1]``; higher = sparser."""
    if saliency.dim() < 2:
        raise ValueError(f"expected a batch of maps (B, ...), got shape {tuple(saliency.shape)}.")
    values = saliency.detach().abs().flatten(1).double().sort(dim=1).values
    n = values.shape[1]
    if n < 2:
        raise ValueError("each map needs at least two values.")
    index = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    total = values.sum(1)
    gini = ((2 * index - n - 1) * values).sum(1) / (n * total.clamp_min(1e-300))
    gini = torch.where(total > 0, gini, torch.zeros_like(gini))
    return (gini * n / (n - 1)).to(torch.float32)
