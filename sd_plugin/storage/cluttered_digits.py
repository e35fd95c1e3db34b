"""Cluttered digits: scikit-learn's digits at a random place on a canvas strewn with fragments of other digits.

The demo's ground truth, built in memory in a fraction of a second and offline everywhere (the
cluttered-MNIST construction of Mnih et al., 2014, on the 8 x 8 digits): each canvas holds one digit,
whose class is the label, at a random position, and ``fragments`` random crops of *other* digits
(of any class, so they carry no evidence of the label) at other random positions. The mask is the
digit's square: where the class evidence is, by construction, so relevance mass and the pointing
game (``sd_plugin.evaluation.localization``) can score whether a saliency map looks there.

Example:
    >>> train, test = cluttered_digits_splits(canvas_size=20, digit_size=12, train_copies=2)
    >>> item = test[0]
    >>> tuple(item["pixel_values"].shape), tuple(item["masks"].shape), int(item["masks"].sum())
    ((1, 20, 20), (20, 20), 144)
    >>> len(train) // 2 + len(test)
    1797
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor_datasets import MaskedTensorImageDataset

__all__ = ["MaskedTensorImageDataset", "cluttered_digits_splits", "compose_cluttered"]


def compose_cluttered(
    digits: Tensor,
    shown: Tensor,
    canvas_size: int,
    fragments: int,
    fragment_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Canvases ``(N, 1, S, S)`` in [0, 1] and masks ``(N, S, S)``; canvas ``i`` shows ``digits[shown[i]]``.

    ``digits`` is the pool ``(M, 1, d, d)`` in [0, 1]. Each fragment of canvas ``i`` is a random
    ``fragment_size`` crop of a random *other* digit of the pool, pasted (by maximum) at a random
    place; the digit is pasted last, by maximum, so the clutter may touch it but never covers it.

    Example:
        >>> pool = torch.rand(5, 1, 6, 6)
        >>> canvases, masks = compose_cluttered(pool, torch.tensor([0, 0, 3]), 12, 2, 3, torch.Generator())
        >>> tuple(canvases.shape), masks.sum((1, 2)).tolist()
        ((3, 1, 12, 12), [36, 36, 36])
    """
    pool, _, size, _ = digits.shape
    if not 0 < fragment_size <= size < canvas_size:
        raise ValueError(
            f"need 0 < fragment_size ({fragment_size}) <= digit size ({size}) < canvas_size ({canvas_size})."
        )
    if fragments and pool < 2:
        raise ValueError("clutter needs at least 2 digits in the pool: fragments come from the other digits.")
    count = shown.shape[0]
    canvases = torch.zeros(count, 1, canvas_size, canvas_size)
    masks = torch.zeros(count, canvas_size, canvas_size, dtype=torch.bool)
    for index, own in enumerate(shown.tolist()):
        for _ in range(fragments):
            other = int(torch.randint(pool - 1, (), generator=generator))
            other += other >= own  # never the canvas's own digit
            top, left = torch.randint(size - fragment_size + 1, (2,), generator=generator).tolist()
            piece = digits[other, :, top : top + fragment_size, left : left + fragment_size]
            y, x = torch.randint(canvas_size - fragment_size + 1, (2,), generator=generator).tolist()
            region = canvases[index, :, y : y + fragment_size, x : x + fragment_size]
            torch.maximum(region, piece, out=region)
        y, x = torch.randint(canvas_size - size + 1, (2,), generator=generator).tolist()
        region = canvases[index, :, y : y + size, x : x + size]
        torch.maximum(region, digits[own], out=region)
        masks[index, y : y + size, x : x + size] = True
    return canvases, masks


def cluttered_digits_splits(
    canvas_size: int = 20,
    digit_size: int | None = None,
    fragments: int = 4,
    fragment_size: int | None = None,
    train_copies: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[MaskedTensorImageDataset, MaskedTensorImageDataset]:
    """Train / test splits of cluttered digits, scaled to [-1, 1], with the digit's square as the mask.

    The split is the one of ``load_digits_splits(seed=seed)``; the clutter of each split is drawn
    from that split's own digits, so no test digit appears in a training canvas. ``train_copies``
    canvases are drawn for each training digit (new positions and clutter each). The digit and the
    fragments scale with the canvas unless given: 0.6 and 0.15 of its side (12 and 3 px at 20 px).
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    digit_size = digit_size if digit_size is not None else max(2, round(0.6 * canvas_size))
    fragment_size = fragment_size if fragment_size is not None else max(1, round(0.15 * canvas_size))
    if train_copies < 1:
        raise ValueError(f"train_copies={train_copies} must be at least 1 (canvases per training digit).")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(digit_size, digit_size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_count = int(round(test_fraction * len(labels)))
    generator = torch.Generator().manual_seed(seed + 1)
    splits = []
    for indices, copies in ((order[test_count:], train_copies), (order[:test_count], 1)):
        shown = torch.arange(len(indices)).repeat(copies)
        canvases, masks = compose_cluttered(images[indices], shown, canvas_size, fragments, fragment_size, generator)
        splits.append(MaskedTensorImageDataset((canvases - 0.5) / 0.5, labels[indices][shown], masks))
    return splits[0], splits[1]
