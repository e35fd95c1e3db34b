"""Model guidance with the Energy loss (Rao, Böhle, Parchami-Araghi & Schiele, ICCV 2023).

``energy_loss = mean over annotated images of (1 - Σ pos(a) · mask / Σ pos(a))``, where ``a`` is the
target class's explanation: Input×Gradient at the input (``input_x_gradient_map``) or Grad-CAM of
the last feature map (``gradcam_map``, the mask averaged down to the map). Both keep their graph
(``create_graph``) so the loss trains the explanation. An image whose mask is all ones counts as not
annotated (a dataset with a fraction of images annotated gives the others full masks).

The controls of the paper's claim (``guidance_masks``): the same loss with each image given another
image's mask (``shuffle_masks``), and with one centred disc of the batch's mean mask area
(``centred_disc_masks``): the "look at the middle" prior that shuffled masks still teach.

Example:
    >>> import torch
    >>> maps = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    >>> masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    >>> round(float(energy_loss(maps, masks)), 4)  # 1 - 1/4
    0.75
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bcos import BcosLinear, global_pool_module

__all__ = [
    "centred_disc_masks",
    "energy_loss",
    "feature_map_module",
    "gradcam_map",
    "guidance_masks",
    "input_x_gradient_map",
    "recording_feature_map",
    "shuffle_masks",
]


def _as_masks(masks: Tensor, like: Tensor) -> Tensor:
    masks = masks.to(device=like.device, dtype=torch.float32)
    return masks.squeeze(1) if masks.dim() == 4 else masks


def energy_loss(maps: Tensor, masks: Tensor) -> Tensor:
    """``mean_i (1 - Σ pos(maps_i) masks_i / Σ pos(maps_i))`` over annotated images (0 when none is).

    ``maps``: ``(B, h, w)`` explanations (any sign: the positive part counts); ``masks``: ``(B, H, W)``,
    averaged down to ``(h, w)`` when larger (a soft mask on a coarse map).
    """
    masks = _as_masks(masks, maps)
    annotated = (masks.flatten(1).amin(1) < 1).float()
    if masks.shape[-2:] != maps.shape[-2:]:
        masks = F.adaptive_avg_pool2d(masks.unsqueeze(1), maps.shape[-2:]).squeeze(1)
    positive = maps.float().clamp_min(0)
    inside = (positive * masks).flatten(1).sum(1)
    energy = inside / (positive.flatten(1).sum(1) + 1e-12)
    # weighted, not indexed: no host sync in the step, and the graph is the same when nothing is annotated
    return ((1 - energy) * annotated).sum() / annotated.sum().clamp_min(1)


def input_x_gradient_map(logits: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
    """``(B, H, W)``: ``Σ_channels x ⊙ d logit_y / d x``, differentiable (``create_graph``)."""
    target = logits.float().gather(1, labels.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(target, inputs, create_graph=True)
    return (inputs * grad).sum(1)


def gradcam_map(logits: Tensor, features: Tensor, labels: Tensor) -> Tensor:
    """``(B, h, w)``: Grad-CAM of ``features`` (``(B, K, h, w)``), ReLU'd, differentiable."""
    target = logits.float().gather(1, labels.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(target, features, create_graph=True)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * features).sum(1))


def shuffle_masks(masks: Tensor) -> Tensor:
    """Each image gets the next image's mask (a derangement for batches of 2 or more)."""
    return torch.roll(masks, shifts=1, dims=0)


def centred_disc_masks(masks: Tensor) -> Tensor:
    """One centred disc with the annotated masks' mean area, for every image (unannotated stay all ones)."""
    flat = _as_masks(masks, masks)
    annotated = flat.flatten(1).amin(1) < 1
    height, width = flat.shape[-2:]
    weights = annotated.float()  # (no host sync: with nothing annotated the disc is not used)
    area = (flat.flatten(1).mean(1) * weights).sum() / weights.sum().clamp_min(1)
    radius = torch.sqrt(area * height * width / torch.pi)
    ys = torch.arange(height, device=flat.device, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, device=flat.device, dtype=torch.float32) - (width - 1) / 2
    disc = ((ys.view(-1, 1) ** 2 + xs.view(1, -1) ** 2) <= radius**2).float()
    return torch.where(annotated.view(-1, 1, 1), disc.expand_as(flat), flat)


def guidance_masks(masks: Tensor, kind: str) -> Tensor:
    """The masks the loss uses: ``"given"``, or the controls ``"shuffled"`` and ``"centred"``."""
    if kind == "given":
        return masks
    if kind == "shuffled":
        return shuffle_masks(masks)
    if kind == "centred":
        return centred_disc_masks(masks)
    raise ValueError(f"guidance_masks={kind!r}: use 'given', 'shuffled' or 'centred'.")


def feature_map_module(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module, "input" | "output")``: where the last spatial feature map passes before the head.

    The input of timm's ``global_pool`` or a transformers ``pooler``; for a B-cos model whose head runs
    before the pooling (``bcosify``), the input of that head.
    """
    for module in model.modules():
        if isinstance(module, BcosLinear) and module.pool_after:
            return module, "input"
    pool = global_pool_module(model)
    if pool is not None:
        return pool[1], "input"
    raise ValueError(
        "energy_layer='features': no global pooling (timm global_pool, transformers pooler) found before the "
        "head; use energy_layer='input'."
    )


@contextlib.contextmanager
def recording_feature_map(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within: the list receives each ``(B, K, h, w)`` feature map that reaches the global pooling / B-cos head."""
    module, _ = feature_map_module(model)
    seen: list[Tensor] = []

    def hook(_module, args):
        if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            seen.append(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
