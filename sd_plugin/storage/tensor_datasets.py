"""Datasets over tensors already in memory: images and labels, and images, labels and object masks.

Example:
    >>> import torch
    >>> data = MaskedTensorImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), torch.ones(2, 4, 4))
    >>> sorted(data[1]), data[1]["labels"]
    (['labels', 'masks', 'pixel_values'], 1)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["MaskedTensorImageDataset", "TensorImageDataset"]


class TensorImageDataset(Dataset):
    """``{"pixel_values", "labels"}`` examples from image and label tensors."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.images[index], "labels": int(self.labels[index])}


class MaskedTensorImageDataset(TensorImageDataset):
    """``{"pixel_values", "labels", "masks"}`` examples from image, label and ``(N, H, W)`` mask tensors."""

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor) -> None:
        super().__init__(images, labels)
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match images {tuple(images.shape)}.")
        self.masks = masks.bool()

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["masks"] = self.masks[index]
        return item
