"""Localization against ground truth: how much of a saliency map falls on the class evidence.

Each image comes with a boolean ``(H, W)`` mask of the pixels that carry its class (for the
package's localization dataset, the pasted object; see ``sd_plugin.storage.localization_data``). No pixel
is removed, so a model trained to ignore removal cannot pass these by construction. Definitions
are Quantus 0.6.0's (``RelevanceMassAccuracy``, ``RelevanceRankAccuracy``, ``PointingGame``, with
their defaults ``abs=False`` and max-normalisation, which changes none of the three), computed
batched on the device; an image with an empty mask scores NaN, as in Quantus.

- relevance mass accuracy: the share of the map's total inside the mask; a signed map (one with a
  negative value) is scored on its magnitude, as Quantus's ``abs=True`` does — its signed total
  can be near zero, which made the ratio unbounded (29.8 was once reported);
- relevance rank accuracy: with ``K`` mask pixels, the share of the map's top ``K`` inside it;
- pointing game: 1 if the map's maximum lies inside the mask (any of tied maxima), else 0;
- energy pointing game (Wang et al. 2020, as Rao et al. 2023 use it): the share of the map's
  *positive* part inside the mask — for signed maps (Input×Gradient, a model's own contributions)
  the evidence *for* the class; equal to relevance mass for non-negative maps. A map with no
  positive value scores 0.

Example:
    >>> import torch
    >>> maps = torch.tensor([[[0.0, 3.0], [1.0, 0.0]]])
    >>> mask = torch.tensor([[[False, True], [False, False]]])
    >>> localization_scores(maps, mask)
    {'relevance_mass': [0.75], 'relevance_rank': [1.0], 'pointing_game': [1.0], 'energy_pointing_game': [0.75]}
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LOCALIZATION_METRICS",
    "energy_pointing_game",
    "localization_scores",
    "pointing_game",
    "relevance_mass",
    "relevance_rank",
]

LOCALIZATION_METRICS = ("relevance_mass", "relevance_rank", "pointing_game", "energy_pointing_game")


def _flat(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps and masks must both be (B, H, W); got {tuple(maps.shape)} and {tuple(masks.shape)}.")
    return maps.flatten(1).double(), masks.flatten(1).bool()


def _nan_where_empty(scores: Tensor, masks: Tensor) -> Tensor:
    return torch.where(masks.any(1), scores, torch.full_like(scores, float("nan")))


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's total that lies inside its mask, magnitudes for signed maps: ``(B,)`` in [0, 1].

    Example:
        >>> maps = torch.tensor([[[2.0, -1.0], [1.0, 0.0]]])
        >>> relevance_mass(maps, torch.tensor([[[True, True], [False, False]]])).tolist()
        [0.75]
    """
    values, inside = _flat(maps, masks)
    values = torch.where((values < 0).any(1, keepdim=True), values.abs(), values)
    total = values.sum(1)
    share = torch.where(total > 0, (values * inside).sum(1) / total.clamp_min(1e-300), torch.zeros_like(total))
    return _nan_where_empty(share, inside)


def relevance_rank(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's top-``K`` pixels inside its mask, ``K`` = the mask's size: ``(B,)``."""
    values, inside = _flat(maps, masks)
    order = values.argsort(dim=1, descending=True, stable=True)
    sizes = inside.sum(1, keepdim=True)
    top = torch.arange(values.shape[1], device=values.device).expand_as(order) < sizes
    hits = (inside.gather(1, order) & top).sum(1).double()
    return _nan_where_empty(hits / sizes[:, 0].clamp_min(1).double(), inside)


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """1.0 where a maximum of the map lies inside the mask, else 0.0: ``(B,)``."""
    values, inside = _flat(maps, masks)
    peaks = values == values.amax(1, keepdim=True)
    return _nan_where_empty((peaks & inside).any(1).double(), inside)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's positive part inside its mask (0 without a positive value): ``(B,)``.

    Example:
        >>> maps = torch.tensor([[[2.0, -5.0], [1.0, 1.0]]])
        >>> energy_pointing_game(maps, torch.tensor([[[True, True], [False, False]]])).tolist()
        [0.5]
    """
    values, inside = _flat(maps, masks)
    positive = values.clamp_min(0)
    total = positive.sum(1)
    share = torch.where(total > 0, (positive * inside).sum(1) / total.clamp_min(1e-300), torch.zeros_like(total))
    return _nan_where_empty(share, inside)


def localization_scores(maps: Tensor, masks: Tensor) -> dict[str, list[float]]:
    """Per-image scores of the three metrics: ``{name: [score per image]}``."""
    return {
        "relevance_mass": relevance_mass(maps, masks).tolist(),
        "relevance_rank": relevance_rank(maps, masks).tolist(),
        "pointing_game": pointing_game(maps, masks).tolist(),
        "energy_pointing_game": energy_pointing_game(maps, masks).tolist(),
    }
