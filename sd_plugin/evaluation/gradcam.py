"""Grad-CAM (Selvaraju et al. 2017) of any classifier: the last spatial feature map, found by a probe.

``grad_cam(model, images, labels)`` returns ``(B, H, W)`` maps: the layer's activations ``A``
weighted by the spatial mean of ``d logit_y / d A`` per channel, summed over channels, ReLU'd and
upsampled bilinearly to the input size — Captum's ``LayerGradCam(relu_attributions=True)``
followed by ``LayerAttribution.interpolate(..., "bilinear")`` (tested equal to it). Captum is not
called directly because its layer must already be ``(B, C, h, w)``: vision transformers give
tokens, which are reshaped here to the patch grid (the class / distillation tokens dropped).

The layer, unless named, is found once per model by a probe forward and backward: the last module
(in execution order) whose output is a feature map (``(B, C, h, w)`` with ``h * w > 1``, its grid
the image's divided by one stride) or a token sequence that reshapes to one, and whose gradient
reaches more than one position; first of the width of the last such map and, for tokens, the
output of a normalisation layer (the residual stream as a block reads it, not a projection inside
the block), then any. For a CNN that is
the last convolutional stage (what the head pools); for a ViT whose head reads the class token, the
input of the last block's attention (the last block's output reaches the head only through the
class token, so its patch tokens have no gradient: pytorch-grad-cam's ``blocks[-1].norm1``).

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet10t", num_classes=3).eval()
    >>> maps = grad_cam(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
    >>> tuple(maps.shape), bool((maps >= 0).all()), gradcam_layer(model, torch.randn(1, 3, 64, 64))
    ((2, 64, 64), True, 'layer4')
    >>> gradcam_layer(model, torch.randn(1, 3, 32, 32))  # layer4 is 1 x 1 at 32 px
    'layer3'
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model_fn import logits_fn

__all__ = ["feature_grid", "grad_cam", "gradcam_layer"]

# token outputs of these are the residual stream as a block reads it (a ViT's norm1 / layernorm_before)
_NORMS = (nn.LayerNorm, nn.GroupNorm)
# model -> {input (H, W) -> layer name}: at a small input a late map may shrink to one position
_FOUND: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = weakref.WeakKeyDictionary()


def feature_grid(output: Any) -> Tensor | None:
    """A layer output as a ``(B, C, h, w)`` feature map: itself, or tokens ``(B, T, C)`` reshaped to the patch grid.

    ``T`` tokens reshape when ``T``, ``T - 1`` (a class token) or ``T - 2`` (class and distillation
    tokens) is a square above 1; the leading tokens are dropped. None for anything else.

    Example:
        >>> feature_grid(torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
    """
    if not isinstance(output, Tensor):
        return None
    if output.dim() == 4:
        return output if output.shape[-1] * output.shape[-2] > 1 else None
    if output.dim() != 3:
        return None
    tokens = output.shape[1]
    for prefix in (0, 1, 2):
        side = math.isqrt(tokens - prefix) if tokens > prefix else 0
        if side > 1 and side * side == tokens - prefix:
            return output[:, prefix:].transpose(1, 2).reshape(output.shape[0], output.shape[2], side, side)
    return None


def _module_named(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise ValueError(f"layer={name!r} is not a module of {type(model).__name__}.") from error


def _on_the_image_grid(output: Any, size: tuple[int, ...]) -> bool:
    """A feature map whose grid divides the image by one stride (not attention's (B, heads, T, d) tensors)."""
    grid = feature_grid(output)
    if grid is None:
        return False
    height, width = grid.shape[-2:]
    return size[0] % height == 0 and size[1] % width == 0 and size[0] // height == size[1] // width


def gradcam_layer(model: nn.Module, example: Tensor) -> str:
    """The name of the module Grad-CAM reads (see the module docstring); found once per model and input size."""
    size = tuple(example.shape[-2:])
    if size in _FOUND.get(model, {}):
        return _FOUND[model][size]
    forward = logits_fn(model)
    outputs: list[tuple[str, Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def keep(module: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            if _on_the_image_grid(output, size) and output.requires_grad:
                output.retain_grad()
                outputs.append((name, output, output.dim() == 4 or isinstance(module, _NORMS)))

        handles.append(module.register_forward_hook(keep))
    try:
        with torch.enable_grad():
            x = example[:1].detach().clone().requires_grad_(True)
            logits = forward(x)
            logits[0].max().backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    # the width of the last map is the model's feature width: prefer the residual stream / the last
    # stage's output over projections inside a block (a ViT's qkv), then accept any width
    width = feature_grid(outputs[-1][1]).shape[1] if outputs else None
    for same_width, preferred_only in ((True, True), (True, False), (False, False)):
        for name, output, preferred in reversed(outputs):  # the last in execution order first
            grid = feature_grid(output.grad) if output.grad is not None else None
            if grid is None or (same_width and grid.shape[1] != width) or (preferred_only and not preferred):
                continue
            if int((grid.abs().sum(1) > 0).sum()) > 1:
                _FOUND.setdefault(model, {})[size] = name
                return name
    raise ValueError(
        f"Grad-CAM found no feature map in {type(model).__name__} whose gradient reaches more than one position; "
        "pass layer='<module name>' (a module whose output is (B, C, h, w) or (B, tokens, C))."
    )


def grad_cam(model: nn.Module, images: Tensor, labels: Tensor, layer: str | None = None) -> Tensor:
    """``(B, H, W)`` Grad-CAM maps of ``labels`` (ReLU'd, bilinearly upsampled to the images' size)."""
    name = layer or gradcam_layer(model, images)
    module = _module_named(model, name)
    forward = logits_fn(model)
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # the graph reaches the layer whatever is frozen
            logits = forward(x)
            activation = captured[-1]
            picked = logits.float().gather(1, labels.view(-1, 1)).sum()
            (gradient,) = torch.autograd.grad(picked, activation)
    finally:
        handle.remove()
    activations, gradients = feature_grid(activation.detach()), feature_grid(gradient)
    if activations is None or gradients is None:
        raise ValueError(f"layer {name!r} gives {tuple(activation.shape)}: not a feature map or a token grid.")
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations.float()).sum(1, keepdim=True))
    return F.interpolate(cam, size=images.shape[-2:], mode="bilinear")[:, 0]
