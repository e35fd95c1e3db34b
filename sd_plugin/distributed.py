"""Autograd-aware reductions over ``torch.distributed`` processes (identity when not distributed)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["sum_over_processes"]


def sum_over_processes(tensor: Tensor, enabled: bool = True) -> Tensor:
    """Sum of ``tensor`` over all processes, differentiable; ``tensor`` itself when disabled or alone.

    The backward all-reduces the gradients too, so with DDP's gradient averaging a statistic
    computed from all processes' batches gets the same gradients as on one process.
    """
    if enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
