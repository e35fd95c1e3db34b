"""Dimensional collapse of the penultimate features: which units are alive, and a warning.

A feature is *dead* on a batch when its standard deviation over the batch is below
``DEAD_STD_RATIO`` (0.1%) of the root-mean-square standard deviation of all features:
it is (nearly) the same for every image, so the head cannot use it. The fraction of live
features is logged at every step as ``live_features``; ``CollapseMonitor`` warns once when it
falls below a fraction of the width.

Example:
    >>> import torch
    >>> f = torch.randn(64, 8)
    >>> f[:, :2] = 0.5  # two dead (constant) features
    >>> float(live_feature_fraction(f))
    0.75
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..utils.errors import SaliencyDecorWarning

__all__ = ["DEAD_STD_RATIO", "CollapseMonitor", "FeatureCollapseWarning", "live_feature_fraction"]

DEAD_STD_RATIO = 1e-3


class FeatureCollapseWarning(SaliencyDecorWarning):
    """The penultimate features lost most of their live units during training."""


@torch.no_grad()
def live_feature_fraction(features: Tensor, dead_std_ratio: float = DEAD_STD_RATIO) -> Tensor:
    """Fraction of the ``D`` features of a ``(B >= 2, D)`` batch that are alive, as a 0-dim tensor.

    Alive: standard deviation over the batch at least ``dead_std_ratio`` times the RMS standard
    deviation of all features. All-constant features give 0. No host synchronisation.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"live_feature_fraction expects (B >= 2, D) features, got {tuple(features.shape)}.")
    f = features.detach().float()
    variance = f.var(0, unbiased=False)
    reference = variance.mean()
    alive = (variance > dead_std_ratio**2 * reference) & (reference > 0)
    return alive.float().mean()


class CollapseMonitor:
    """Warns once when the logged ``live_features`` fraction falls below ``min_fraction``.

    Both training loops call ``check`` with their logged values (read at logging time, so no
    extra host synchronisation).

    Example:
        >>> monitor = CollapseMonitor(min_fraction=0.5)
        >>> monitor.check({"live_features": 0.9}, step=10)
        False
    """

    def __init__(self, min_fraction: float = 0.5) -> None:
        if not 0.0 <= min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}.")
        self.min_fraction = min_fraction
        self.warned = False

    def check(self, logs: dict[str, float], step: int | None = None) -> bool:
        """Warn (once per monitor) when ``logs["live_features"] < min_fraction``; return whether it did now."""
        fraction = logs.get("live_features")
        if self.warned or fraction is None or fraction >= self.min_fraction:
            return False
        self.warned = True
        where = f" at step {step}" if step is not None else ""
        message = (
            f"only {fraction:.0%} of the penultimate features are alive{where} (below {self.min_fraction:.0%} of "
            "the width): the features are collapsing. Lower decor_weight or the learning rate, or compare with "
            "method='sgt'; `live_features` in the logs tracks it."
        )
        warnings.warn(message, FeatureCollapseWarning, stacklevel=2)
        return True
