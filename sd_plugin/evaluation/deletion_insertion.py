"""RISE's deletion and insertion metrics (Petsiuk et al. 2018), batched on the device.

Deletion: the most salient pixels are removed first (replaced by ``deletion_fill``,
RISE: zeros) and the probability of the target class is tracked; a faithful saliency
makes it fall fast, so *lower* AUC is better. Insertion: starting from a blurred copy,
the most salient pixels are inserted first; *higher* AUC is better. AUCs use RISE's
``auc`` (trapezoid over the fraction of pixels, normalised to ``[0, 1]``).

Example:
    >>> rise_auc([1.0, 0.5, 0.0])
    0.5
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.masking import fill_values, num_masked_pixels
from ..utils.batches import unpack_batch
from .attribution import Attribution, check_attribution, saliency_maps
from .masking_curve import batch_count, pixel_ranks, progress_bar
from .model_fn import LogitsFn, evaluation_mode, prepare_for_evaluation

__all__ = ["DeletionInsertion", "deletion_insertion", "rise_auc"]


def rise_auc(values: Sequence[float]) -> float:
    """RISE's ``auc``: ``(sum - first/2 - last/2) / (n - 1)`` of equally spaced values."""
    if len(values) < 2:
        raise ValueError("need at least two points.")
    values = [float(v) for v in values]
    return (sum(values) - values[0] / 2 - values[-1] / 2) / (len(values) - 1)


@dataclass
class DeletionInsertion:
    """Mean target probability along the deletion and insertion paths."""

    fractions: list[float]
    deletion: list[float]
    insertion: list[float]
    num_images: int
    per_image_deletion_auc: list[float] = field(default_factory=list)
    per_image_insertion_auc: list[float] = field(default_factory=list)

    @property
    def deletion_auc(self) -> float:
        return rise_auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return rise_auc(self.insertion)

    def to_dict(self) -> dict:
        return {
            "fractions": self.fractions,
            "deletion": self.deletion,
            "insertion": self.insertion,
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
            "num_images": self.num_images,
            "per_image_deletion_auc": self.per_image_deletion_auc,
            "per_image_insertion_auc": self.per_image_insertion_auc,
        }


@torch.no_grad()
def deletion_insertion(
    model: nn.Module | LogitsFn,
    dataloader: Iterable,
    steps: int = 20,
    attribution: Attribution = "gradient",
    target: str = "prediction",
    deletion_fill: str = "zero",
    insertion_fill: str = "blur",
    max_batch_size: int | None = None,
    device: torch.device | str | None = None,
    max_images: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> DeletionInsertion:
    """Deletion/insertion curves and AUCs of ``model`` over ``dataloader``.

    Args:
        steps: number of equal steps from 0 to all pixels (``steps + 1`` points).
        attribution: saliency method (see ``sd_plugin.evaluation.attribution``).
        target: ``"prediction"`` (RISE: the model's top-1 on the clean image) or ``"label"``.
        deletion_fill, insertion_fill: the substrates (RISE: zeros and a blur).
        max_batch_size: images per forward (default: one fraction, deletion and insertion
            together, per forward).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if target not in ("prediction", "label"):
        raise ValueError(f"target={target!r} is not supported; use 'prediction' or 'label'.")
    check_attribution(attribution)
    with evaluation_mode(model):  # every submodule gets its own mode back
        forward, device, generator = prepare_for_evaluation(model, device, seed)
        fractions = [i / steps for i in range(steps + 1)]
        per_image: list[Tensor] = []  # (points, 2, B) target probabilities per batch
        seen = 0
        batches = batch_count(dataloader, max_images)
        total = None if batches is None else batches * len(fractions)  # one unit per level (chunks of levels)
        bar = progress_bar(total, progress, "deletion/insertion", "level")
        for batch in dataloader:
            images, labels = unpack_batch(batch)
            if max_images is not None:
                if seen >= max_images:
                    break
                images, labels = images[: max_images - seen], labels[: max_images - seen]
            images, labels = images.to(device), labels.to(device)
            if target == "prediction":
                labels = forward(images).argmax(-1)
            ranks = pixel_ranks(saliency_maps(model, images, labels, attribution, generator, offset=seen))
            substrates = (fill_values(images, deletion_fill, generator), fill_values(images, insertion_fill, generator))
            batch_size, num_pixels = images.shape[0], ranks.shape[1]
            per_chunk = max(1, (max_batch_size or 2 * batch_size) // (2 * batch_size))
            picked_batch = torch.zeros(len(fractions), 2, batch_size, dtype=torch.float64, device=device)
            for start in range(0, len(fractions), per_chunk):
                chunk = fractions[start : start + per_chunk]
                variants = []
                for fraction in chunk:
                    changed = (ranks < num_masked_pixels(fraction, num_pixels)).view(batch_size, 1, *images.shape[2:])
                    variants.append(torch.where(changed, substrates[0], images))
                    variants.append(torch.where(changed, images, substrates[1]))
                probabilities = forward(torch.cat(variants)).float().softmax(-1)
                probabilities = probabilities.view(len(chunk), 2, batch_size, -1)
                picked = probabilities.gather(-1, labels.view(1, 1, -1, 1).expand(len(chunk), 2, -1, 1))[..., 0]
                picked_batch[start : start + len(chunk)] = picked.double()
                bar.update(len(chunk))
            per_image.append(picked_batch)
            seen += batch_size
        bar.close()
        if seen == 0:
            raise ValueError("the dataloader yielded no images; pass a non-empty evaluation set.")
        probabilities = torch.cat(per_image, 2)  # (points, 2, N)
        mean = probabilities.mean(2)
        # RISE's auc per image: the trapezoid over equally spaced points
        per_image_auc = (probabilities.sum(0) - probabilities[0] / 2 - probabilities[-1] / 2) / (len(fractions) - 1)
        return DeletionInsertion(
            fractions,
            mean[:, 0].tolist(),
            mean[:, 1].tolist(),
            seen,
            per_image_auc[0].tolist(),
            per_image_auc[1].tolist(),
        )
