"""Calling any image classifier for evaluation: transformers, timm, PEFT or plain torch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..adapter import extract_logits, is_transformers_model, unwrap_model

__all__ = ["LogitsFn", "logits_fn", "prepare_for_evaluation"]

LogitsFn = Callable[[Tensor], Tensor]


def logits_fn(model: nn.Module | LogitsFn) -> LogitsFn:
    """A function ``pixel_values -> logits`` for ``model``.

    Example:
        >>> import timm, torch
        >>> fn = logits_fn(timm.create_model("resnet10t", num_classes=4))
        >>> tuple(fn(torch.zeros(2, 3, 32, 32)).shape)
        (2, 4)
    """
    if not isinstance(model, nn.Module):
        return model
    if is_transformers_model(unwrap_model(model)):
        return lambda x: extract_logits(model(pixel_values=x))
    return lambda x: extract_logits(model(x))


def prepare_for_evaluation(
    model: nn.Module | LogitsFn, device: torch.device | str | None, seed: int
) -> tuple[LogitsFn, torch.device, torch.Generator]:
    """Eval mode, the device to run on (default: the model's), the forward and a seeded generator."""
    if isinstance(model, nn.Module):
        model.eval()
        if device is None:
            reference = next(model.parameters(), None)
            device = reference.device if reference is not None else "cpu"
    device = torch.device(device or "cpu")
    return logits_fn(model), device, torch.Generator(device=device).manual_seed(seed)
