"""Autograd-aware reductions over ``torch.distributed`` processes (identity when not distributed)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["max_over_processes", "sum_over_processes"]


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) forward; the gradient of a sum is the sum of the processes' gradients.

    (What the deprecated ``torch.distributed.nn.functional.all_reduce`` did for ``SUM``.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        summed = grad.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed


def sum_over_processes(tensor: Tensor, enabled: bool = True) -> Tensor:
    """Sum of ``tensor`` over all processes, differentiable; ``tensor`` itself when disabled or alone.

    The backward all-reduces the gradients too, so with DDP's gradient averaging a statistic
    computed from all processes' batches gets the same gradients as on one process.
    """
    if enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _SumOverProcesses.apply(tensor)
    return tensor


def max_over_processes(tensor: Tensor) -> Tensor:
    """Elementwise maximum of ``tensor`` over all processes (not differentiable); a copy when alone.

    A collective: every process must call it at the same point.
    """
    result = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result
