"""Running statistics (BatchNorm, ``GroupZCA``) that a forward pass may leave untouched.

The masked pass of a step with ``masked_pass_updates_stats=False`` runs inside
``frozen_running_stats``: it still normalises with the batch statistics, but the running
buffers keep the clean passes' estimates.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> with frozen_running_stats(bn):
    ...     _ = bn(torch.randn(8, 3) + 5)
    >>> bn.running_mean.tolist()
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .whitening import GroupZCA

__all__ = ["frozen_running_stats", "running_stat_modules"]


def running_stat_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose running statistics change in train-mode forwards (BatchNorm, GroupZCA)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, GroupZCA)) and m.track_running_stats
    ]


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Forwards inside the block use batch statistics but leave running buffers unchanged."""
    modules = running_stat_modules(model)
    for m in modules:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in modules:
            m.track_running_stats = True
