"""Decorrelation loss: the paper's "deviation from orthogonality" of features, made collapse-proof.

``decorrelation_loss(z) = (1/D) * sum_{i != j} R_ij^2 + w * sum_i (1 - R_ii)^2``

``R`` is the correlation matrix of the batch ``z``, standardised per feature with a ridge
relative to the features' average variance: ``z_hat_i = (z_i - mean) / sqrt(var_i + r * mean_j var_j)``,
``R = z_hat^T z_hat / B``. The first term is the paper's: invariant to the scale of the
batch, about ``(D - 1) / B`` for ``D`` independent features (the sampling noise of ``R``), and
growing towards ``D - 1`` as features become copies of one another.

The paper's term alone rewards dimensional collapse: a dead (constant) feature standardises
to zero and has no correlation, so killing units lowers it, and training finds that route
(SaliencyDecor runs of the paper's CNN lost most of their features). The second term, the
diagonal of Barlow Twins, closes it: ``R_ii = var_i / (var_i + r * mean var)`` is about 1 for a
live feature and 0 for a dead one, so a dead feature costs ``w`` (``liveness_weight``, default 2),
while removing feature ``i`` saves at most ``(2/D) sum_j R_ij^2 <= 2 (D - 1) / D < 2`` of the
first term: with ``w = 2`` killing a unit does not lower the loss, whatever its correlations.
The ridge ``r`` (``dead_variance_ratio``, 1%) bounds the gradient that a near-constant feature
receives (the plain standardisation divides it by its tiny standard deviation) and gives
the diagonal its gradient, which pushes a dying feature's variance back up. ``liveness_weight=0``
gives the paper's term alone, with the plain standardisation (``eps`` only).

Example:
    >>> import torch
    >>> from sd_plugin import decorrelation_loss
    >>> f = torch.randn(512, 8)
    >>> float(decorrelation_loss(f)) < 0.05
    True
    >>> float(decorrelation_loss(f[:, :1].repeat(1, 8))) > 6.5  # copies: near the maximum D - 1 = 7
    True
    >>> dead = f.clone(); dead[:, :4] = 0.0
    >>> float(decorrelation_loss(dead)) > float(decorrelation_loss(f)) + 7.9  # 4 dead units cost 2 each
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..utils.distributed import sum_over_processes
from ..utils.precision import at_least_float32, autocast_off
from .whitening import GroupZCA

__all__ = [
    "compiled_decorrelation_loss",
    "compiled_whitened_decorrelation_loss",
    "decorrelation_floor",
    "decorrelation_loss",
    "whitened_decorrelation_loss",
]

LIVENESS_WEIGHT = 2.0
DEAD_VARIANCE_RATIO = 0.01


def decorrelation_loss(
    features: Tensor,
    eps: float = 1e-10,
    sync: bool = False,
    liveness_weight: float = LIVENESS_WEIGHT,
    dead_variance_ratio: float = DEAD_VARIANCE_RATIO,
) -> Tensor:
    """Off-diagonal correlation plus the liveness diagonal (module docstring), ``(B, D) -> ()``, in float32.

    Args:
        features: a batch of ``B >= 2`` feature vectors of width ``D >= 2``.
        eps: added to the variance before standardising (all-constant batches give 0, not NaN).
        sync: compute the statistics over the batches of all ``torch.distributed``
            processes (autograd-aware), so N processes with B/N equal one with B.
        liveness_weight: ``w``, what a dead feature costs (``0``: the paper's term alone;
            ``>= 2``: killing a feature does not lower the loss).
        dead_variance_ratio: ``r``, the variance (relative to the mean over features) at
            which a feature counts half dead (``R_ii = 1/2``).
    """
    if features.dim() != 2:
        raise ValueError(f"decorrelation_loss expects (B, D) features, got {tuple(features.shape)}.")
    batch, width = features.shape
    if batch < 2 and not sync:
        raise ValueError(
            f"decorrelation_loss needs a batch of at least 2 samples, got {batch} (a feature's correlation "
            "needs two samples); skip the term for such batches or drop incomplete last batches."
        )
    if liveness_weight < 0:
        raise ValueError(f"liveness_weight must be >= 0, got {liveness_weight}.")
    if not 0.0 < dead_variance_ratio <= 1.0:
        raise ValueError(f"dead_variance_ratio must be in (0, 1], got {dead_variance_ratio}.")
    with autocast_off(features):
        f = at_least_float32(features)
        count = sum_over_processes(f.new_full((), batch), sync)  # no host-to-device copy
        centred = f - sum_over_processes(f.sum(0), sync) / count
        variance = sum_over_processes(centred.pow(2).sum(0), sync) / count
        ridge = eps
        if liveness_weight > 0:
            ridge = dead_variance_ratio * variance.mean().detach() + eps
        standardised = centred / (variance + ridge).sqrt()
        corr = sum_over_processes(standardised.T @ standardised, sync) / count
        diagonal = corr.diagonal()
        loss = (corr.pow(2).sum() - diagonal.pow(2).sum()) / width
        if liveness_weight > 0:
            loss = loss + liveness_weight * (1.0 - diagonal).pow(2).sum()
        return loss


def whitened_decorrelation_loss(whitening: GroupZCA, features: Tensor, **loss_kwargs: object) -> Tensor:
    """``decorrelation_loss`` of ``features`` whitened with their batch statistics (``GroupZCA.whiten_for_loss``).

    The loss of a whitening that feeds only the loss (``whiten_head_input=False``): the whitening
    runs here, not in the model's forward, so it and the loss compile together
    (``compiled_whitened_decorrelation_loss``) and the running statistics nobody reads are not
    updated. ``loss_kwargs`` go to ``decorrelation_loss``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.randn(256, 8, generator=g) @ torch.randn(8, 8, generator=g)  # correlated
        >>> whitening = GroupZCA(8, group_size=8, method="cholesky")
        >>> float(decorrelation_loss(f)) > 0.5, float(whitened_decorrelation_loss(whitening, f)) < 0.2
        (True, True)
    """
    return decorrelation_loss(whitening.whiten_for_loss(features), **loss_kwargs)


@functools.cache
def compiled_whitened_decorrelation_loss() -> Callable[..., Tensor]:
    """``whitened_decorrelation_loss`` under one ``torch.compile`` (whitening and loss fused; compiles per shape)."""
    return torch.compile(whitened_decorrelation_loss)


@functools.cache
def compiled_decorrelation_loss() -> Callable[..., Tensor]:
    """``decorrelation_loss`` under ``torch.compile`` (fused kernels; compiles on first use per shape)."""
    return torch.compile(decorrelation_loss)


def decorrelation_floor(
    batch_size: int,
    num_features: int,
    liveness_weight: float = LIVENESS_WEIGHT,
    dead_variance_ratio: float = DEAD_VARIANCE_RATIO,
) -> float:
    """Expected ``decorrelation_loss`` of independent Gaussian features of equal variance.

    ``(D - 1) / B`` for the paper's term, shrunk by the ridge (``R_ii = 1 / (1 + r)``), plus
    ``w D (r / (1 + r))^2`` from the diagonal.
    """
    if liveness_weight == 0:
        return (num_features - 1) / batch_size
    scale = 1.0 / (1.0 + dead_variance_ratio)
    return (num_features - 1) / batch_size * scale**2 + liveness_weight * num_features * (1.0 - scale) ** 2
