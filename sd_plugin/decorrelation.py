"""Decorrelation loss: the paper's "deviation from orthogonality" of features.

``decorrelation_loss(z) = (1/D) * sum_{i != j} R_ij^2`` with ``R`` the correlation matrix
of the batch ``z`` (standardised per feature, ``R = z_hat^T z_hat / B``). It is invariant
to the scale of each feature; for ``D`` independent features its expected value is
about ``(D - 1) / B`` (the sampling noise of ``R``), and it grows towards ``D - 1`` as
features become copies of one another.

Example:
    >>> import torch
    >>> from sd_plugin import decorrelation_loss
    >>> f = torch.randn(512, 8)
    >>> float(decorrelation_loss(f)) < 0.05
    True
    >>> float(decorrelation_loss(f[:, :1].repeat(1, 8))) > 6.9
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .distributed import sum_over_processes

__all__ = ["decorrelation_loss", "compiled_decorrelation_loss", "decorrelation_floor"]


def decorrelation_loss(features: Tensor, eps: float = 1e-10, sync: bool = False) -> Tensor:
    """Mean squared off-diagonal correlation, ``(B, D) -> ()``, computed in float32.

    Args:
        features: a batch of ``B >= 2`` feature vectors of width ``D >= 2``.
        sync: compute the correlation over the batches of all ``torch.distributed``
            processes (autograd-aware), so N processes with B/N equal one with B.
        eps: added to the variance before standardising (dead units give 0, not NaN);
            small enough to keep the loss invariant to the scale of each feature.
    """
    if features.dim() != 2:
        raise ValueError(f"decorrelation_loss expects (B, D) features, got {tuple(features.shape)}.")
    batch, width = features.shape
    if batch < 2 and not sync:
        raise ValueError(
            f"decorrelation_loss needs a batch of at least 2 samples, got {batch}; "
            "increase the batch size (per_device_train_batch_size)."
        )
    device_type = features.device.type if features.device.type in ("cuda", "cpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        f = features.to(torch.promote_types(features.dtype, torch.float32))
        count = sum_over_processes(f.new_full((), batch), sync)  # no host-to-device copy
        centred = f - sum_over_processes(f.sum(0), sync) / count
        variance = sum_over_processes(centred.pow(2).sum(0), sync) / count
        standardised = centred / (variance + eps).sqrt()
        corr = sum_over_processes(standardised.T @ standardised, sync) / count
        off_diagonal = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
        return off_diagonal / width


@functools.cache
def compiled_decorrelation_loss() -> Callable[..., Tensor]:
    """``decorrelation_loss`` under ``torch.compile`` (fused kernels; compiles on first use per shape)."""
    return torch.compile(decorrelation_loss)


def decorrelation_floor(batch_size: int, num_features: int) -> float:
    """Expected ``decorrelation_loss`` of independent Gaussian features: ``(D - 1) / B``."""
    return (num_features - 1) / batch_size
