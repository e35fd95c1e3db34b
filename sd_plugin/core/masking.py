"""Saliency masking: replace the least salient pixels of each image.

The saliency of a pixel is ``|d loss / d x|`` reduced over channels (mean). For each
sample the ``round(k * H * W)`` pixels with the lowest saliency are replaced by a fill:

- ``"random"`` (default, as the official saliency-guided-training code): uniform values
  inside that sample's per-channel ``[min, max]``;
- ``"mean"``: the sample's per-channel mean;
- ``"zero"``: zeros;
- ``"blur"``: a Gaussian-blurred copy of the image (sigma = 5% of the image size).

Everything runs batched on the input's device: no per-sample loop and no host copy.

Example:
    >>> import torch
    >>> from sd_plugin.core.masking import mask_least_salient
    >>> x = torch.arange(16.0).view(1, 1, 4, 4)
    >>> saliency = torch.arange(16.0).view(1, 4, 4)
    >>> masked, mask = mask_least_salient(x, saliency, ratio=0.25, fill="zero")
    >>> masked.flatten()[:5].tolist(), int(mask.sum())
    ([0.0, 0.0, 0.0, 0.0, 4.0], 4)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.choices import MASK_FILLS, check_mask_ratio

__all__ = [
    "MASK_FILLS",
    "num_masked_pixels",
    "pixel_saliency",
    "lowest_saliency_mask",
    "fill_values",
    "mask_least_salient",
]


def num_masked_pixels(ratio: float, num_pixels: int) -> int:
    """``round(ratio * num_pixels)`` with halves rounded up: the one pixel-count rule.

    Training masks and the evaluation curves (``sd_plugin.evaluation``) both count with it,
    so "25% of 10 pixels" is 3 everywhere.

    >>> num_masked_pixels(0.25, 10), num_masked_pixels(0.05, 784)
    (3, 39)
    """
    return int(math.floor(ratio * num_pixels + 0.5))


def pixel_saliency(input_grad: Tensor) -> Tensor:
    """Channel-mean of ``|input_grad|``: ``(B, C, H, W) -> (B, H, W)``."""
    if input_grad.dim() != 4:
        raise ValueError(f"expected an input gradient of shape (B, C, H, W), got {tuple(input_grad.shape)}.")
    return input_grad.abs().mean(1)


def lowest_saliency_mask(saliency: Tensor, ratio: float) -> Tensor:
    """Boolean ``(B, H, W)`` mask, True on the ``round(ratio*H*W)`` least salient pixels."""
    check_mask_ratio(ratio, name="ratio")
    batch = saliency.shape[0]
    flat = saliency.reshape(batch, -1)
    count = num_masked_pixels(ratio, flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        index = flat.topk(count, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, index, True)
    return mask.view_as(saliency)


def _gaussian_blur(images: Tensor) -> Tensor:
    height, width = images.shape[-2:]
    sigma = max(0.05 * max(height, width), 0.5)
    radius = max(1, int(math.ceil(2 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    blurred = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(blurred, vertical, groups=channels)


def fill_values(images: Tensor, fill: str, generator: torch.Generator | None = None) -> Tensor:
    """The replacement image for ``fill`` (one of ``MASK_FILLS``), same shape as ``images``."""
    if fill == "zero":
        return torch.zeros_like(images)
    if fill == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if fill == "random":
        low = images.amin(dim=(2, 3), keepdim=True)
        high = images.amax(dim=(2, 3), keepdim=True)
        uniform = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return low + (high - low) * uniform
    if fill == "blur":
        return _gaussian_blur(images)
    raise ValueError(f"fill={fill!r} is not supported; use one of {MASK_FILLS}.")


@torch.no_grad()
def mask_least_salient(
    images: Tensor,
    saliency: Tensor,
    ratio: float,
    fill: str = "random",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace the ``ratio`` least salient pixels of each image.

    Args:
        images: ``(B, C, H, W)``.
        saliency: ``(B, H, W)`` per-pixel saliency (see ``pixel_saliency``).
        ratio: fraction ``k`` of pixels to replace, in ``[0, 1)``.
        fill: one of ``MASK_FILLS``.

    Returns:
        The masked images (detached) and the boolean ``(B, H, W)`` mask.
    """
    if images.dim() != 4 or saliency.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"images must be (B, C, H, W) and saliency (B, H, W); got {tuple(images.shape)} "
            f"and {tuple(saliency.shape)}."
        )
    mask = lowest_saliency_mask(saliency, ratio)
    replacement = fill_values(images.detach(), fill, generator)
    masked = torch.where(mask.unsqueeze(1), replacement, images.detach())
    return masked, mask
