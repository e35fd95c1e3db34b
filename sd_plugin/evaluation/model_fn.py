"""Calling any image classifier for evaluation: transformers, timm, PEFT or plain torch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..core.adapter import extract_logits, unwrap_model
from ..core.families import family_of

__all__ = ["LogitsFn", "LogitsModel", "as_logits_model", "evaluation_mode", "logits_fn", "prepare_for_evaluation"]

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
    family = family_of(unwrap_model(model))
    return lambda x: extract_logits(family.call(model, x))


class LogitsModel(nn.Module):
    """``model`` as Captum expects a forward function: ``forward(pixel_values) -> logits`` (a tensor).

    A transformers classifier takes ``pixel_values=`` and returns an output object; Captum's methods
    (``Occlusion``, ``Saliency``, ...) call their model positionally and need a tensor. The wrapped
    model stays reachable as ``.model`` (for a layer to give ``LayerGradCam``, say).

    Example:
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> vit = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=8, num_labels=3))
        >>> tuple(LogitsModel(vit)(torch.zeros(2, 3, 8, 8)).shape)
        (2, 3)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._family = family_of(unwrap_model(model))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return extract_logits(self._family.call(self.model, pixel_values))


def as_logits_model(model: nn.Module | LogitsFn) -> nn.Module | LogitsFn:
    """What an attribution function receives: ``model`` itself when calling it gives logits (timm, plain
    torch, a function), a transformers model (PEFT-wrapped or not) wrapped in ``LogitsModel``."""
    if not isinstance(model, nn.Module) or family_of(unwrap_model(model)).name != "transformers":
        return model
    return LogitsModel(model)


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


@contextmanager
def evaluation_mode(model: nn.Module | LogitsFn) -> Iterator[None]:
    """Run the body with ``model`` in eval mode, then give every submodule back its own mode.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> model[0].eval()  # a mixed model, as with frozen batch norm
        Linear(in_features=2, out_features=2, bias=True)
        >>> with evaluation_mode(model):
        ...     model.training
        False
        >>> model.training, model[0].training, model[1].training
        (True, False, True)
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
