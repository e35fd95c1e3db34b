"""``unpack_batch``: ``(pixel_values, labels)`` from any batch the package accepts, with one set of errors.

The Trainer, the recipes' loop and the evaluation read batches through it: a dict with
``pixel_values`` and ``labels`` (or ``label``, which transformers' default collator renames), or an
``(images, labels)`` pair as torchvision datasets give.

Example:
    >>> import torch
    >>> images, labels = unpack_batch({"pixel_values": torch.zeros(2, 3, 4, 4), "label": [0, 1]})
    >>> tuple(images.shape), labels.tolist()
    ((2, 3, 4, 4), [0, 1])
    >>> unpack_batch({"image": torch.zeros(2, 3, 4, 4), "labels": [0, 1]})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the batch has keys ['image', 'labels'] but no 'pixel_values'; map the dataset so that ...
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unpack_batch"]


def unpack_batch(batch: object) -> tuple[Tensor, Tensor]:
    """``(pixel_values, labels)`` of a dict batch or an ``(images, labels)`` pair (else a ``ValueError``)."""
    if isinstance(batch, dict):
        if "pixel_values" not in batch:
            raise ValueError(
                f"the batch has keys {sorted(batch)} but no 'pixel_values'; map the dataset so that each "
                "example has 'pixel_values' (a C x H x W tensor) and 'labels'."
            )
        images = batch["pixel_values"]
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise ValueError("batches must be {'pixel_values', 'labels'} dicts or (images, labels) pairs.")
    if labels is None:
        raise ValueError(
            "the batch has no labels: the dataset must provide a 'labels' column (or 'label', which the default "
            "collator renames)."
        )
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {shape}.")
    if not images.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point to carry input gradients, got {images.dtype}; "
            "convert images with the model's image processor or transforms.ToTensor()."
        )
    return images, labels if torch.is_tensor(labels) else torch.as_tensor(labels, device=images.device)
