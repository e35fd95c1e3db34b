"""Input gradients of the true-label cross-entropy, batched (the raw material of gradient saliency)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .model_fn import LogitsFn

__all__ = ["input_gradients"]


def input_gradients(forward: LogitsFn, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(d CE / d x, logits)`` for a batch; one forward and one backward.

    The per-sample gradient is that of the sample's own loss (the batch loss is summed,
    so samples do not scale each other).
    """
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    if grad is None or not torch.is_tensor(grad):  # pragma: no cover - autograd returns a tensor
        raise RuntimeError("the model gives no gradient with respect to its input.")
    return grad, logits.detach()
