"""Calling any image classifier for evaluation: transformers, timm, PEFT or plain torch."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..features import _extract_logits, _is_transformers_model, unwrap_model

__all__ = ["LogitsFn", "logits_fn"]

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
    if _is_transformers_model(unwrap_model(model)):
        return lambda x: _extract_logits(model(pixel_values=x))
    return lambda x: _extract_logits(model(x))
