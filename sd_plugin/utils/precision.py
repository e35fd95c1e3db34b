"""Statistics in float32 whatever the autocast: the whitening and the decorrelation loss compute in it.

Example:
    >>> import torch
    >>> x = torch.ones(2, 2, dtype=torch.bfloat16)
    >>> with autocast_off(x):
    ...     at_least_float32(x).dtype
    torch.float32
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_least_float32", "autocast_off"]


def autocast_off(tensor: Tensor) -> torch.autocast:
    """A context that switches autocast off on ``tensor``'s device (``cuda``, else ``cpu``)."""
    device_type = tensor.device.type if tensor.device.type in ("cuda", "cpu") else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or float64 if it already is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
