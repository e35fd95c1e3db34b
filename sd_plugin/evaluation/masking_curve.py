"""The paper's masking test: accuracy after removing the top ``p``% most salient pixels.

For each image the pixels are ranked by the model's own saliency (``|d loss / d x|`` at
the true label, channel mean) or in a random order (the reference); the top ``p``% are
replaced (default: the image's per-channel mean) for ``p = 0, 5, ..., 100`` and the
accuracy (%) is recorded. The AUC is the trapezoid of accuracy (%) over ``p`` (%), in
``[0, 10000]``; lower means the saliency found the pixels that matter. Because a model
that is robust to any pixel removal scores a high AUC in any order, the faithfulness
signal is the gap to the random order, ``(AUC_random - AUC_saliency) / AUC_random``.

All steps of a batch run as large device batches: one forward+backward for the
saliency (whose forward also scores ``p = 0``), then one forward per other level, with no
per-image loop and no host copy.

Example:
    >>> masking_auc([0, 50, 100], [100.0, 50.0, 0.0])
    5000.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..arguments import MaskingTestArguments
from ..masking import MASK_FILLS, fill_values, num_masked_pixels, pixel_saliency
from .attribution import ATTRIBUTIONS, input_gradients, saliency_maps
from .model_fn import LogitsFn, prepare_for_evaluation

__all__ = [
    "ORDERS",
    "masking_curves",
    "masking_metrics_during_training",
    "maybe_progress",
    "random_subset",
    "spread_subset",
    "DEFAULT_PERCENTAGES",
    "MaskingCurve",
    "masking_auc",
    "masking_curve",
    "remove_top_pixels",
    "pixel_ranks",
    "faithfulness_gap",
    "percentages_every",
    "masking_test_metrics",
]

DEFAULT_PERCENTAGES: tuple[float, ...] = tuple(float(p) for p in range(0, 101, 5))
ORDERS = ("saliency", "least_salient", "random")


def masking_auc(percentages: Sequence[float], accuracy: Sequence[float]) -> float:
    """Trapezoid area under accuracy (%) over removed pixels (%): ``[0, 10000]``."""
    if len(percentages) != len(accuracy) or len(percentages) < 2:
        raise ValueError("need at least two (percentage, accuracy) points of equal count.")
    total = 0.0
    for i in range(1, len(percentages)):
        total += (percentages[i] - percentages[i - 1]) * (accuracy[i] + accuracy[i - 1]) / 2.0
    return float(total)


def faithfulness_gap(auc_saliency: float, auc_random: float) -> float:
    """``(AUC_random - AUC_saliency) / AUC_random``: > 0 when saliency beats chance."""
    if auc_random <= 0:
        return 0.0
    return (auc_random - auc_saliency) / auc_random


def percentages_every(step: float) -> tuple[float, ...]:
    """Removal levels ``0, step, 2 step, ..., 100`` (percent).

    Example:
        >>> percentages_every(25)
        (0.0, 25.0, 50.0, 75.0, 100.0)
    """
    if not 0 < step <= 100:
        raise ValueError(f"step must be in (0, 100] percent, got {step}.")
    return tuple(min(100.0, i * float(step)) for i in range(int(round(100 / step)) + 1))


@dataclass
class MaskingCurve:
    """Accuracy (%) after removing the top ``percentages`` (%) of pixels in ``order``."""

    percentages: list[float]
    accuracy: list[float]
    order: str = "saliency"
    fill: str = "mean"
    num_images: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def auc(self) -> float:
        return masking_auc(self.percentages, self.accuracy)

    @property
    def normalized_auc(self) -> float:
        """AUC divided by its maximum ``(p_max - p_min) * 100``; in ``[0, 1]``."""
        span = (self.percentages[-1] - self.percentages[0]) * 100.0
        return self.auc / span if span > 0 else 0.0

    @property
    def clean_accuracy(self) -> float:
        return self.accuracy[0]

    @property
    def relative_auc(self) -> float:
        """AUC relative to the clean accuracy (the AUC if accuracy never dropped)."""
        ceiling = self.clean_accuracy * (self.percentages[-1] - self.percentages[0])
        return self.auc / ceiling if ceiling > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "order": self.order,
            "fill": self.fill,
            "num_images": self.num_images,
            "percentages": self.percentages,
            "accuracy": self.accuracy,
            "auc": self.auc,
            "normalized_auc": self.normalized_auc,
            "relative_auc": self.relative_auc,
        }


def pixel_ranks(scores: Tensor) -> Tensor:
    """Rank of each pixel per image, 0 = highest score: ``(B, H, W) -> (B, H*W)``."""
    flat = scores.reshape(scores.shape[0], -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def _removed_count(percentage: float, num_pixels: int) -> int:
    return num_masked_pixels(percentage / 100.0, num_pixels)


def remove_top_pixels(images: Tensor, ranks: Tensor, percentage: float, fill_image: Tensor) -> Tensor:
    """Replace the top ``percentage`` % ranked pixels of each image by ``fill_image``."""
    count = _removed_count(percentage, ranks.shape[1])
    removed = (ranks < count).view(images.shape[0], 1, *images.shape[2:])
    return torch.where(removed, fill_image, images)


def _validate_percentages(percentages: Iterable[float]) -> list[float]:
    values = [float(p) for p in percentages]
    if len(values) < 2:
        raise ValueError("percentages needs at least two values, e.g. range(0, 101, 5).")
    if any(p < 0 or p > 100 for p in values):
        raise ValueError(f"percentages must lie in [0, 100], got {values}.")
    if values != sorted(values):
        raise ValueError(f"percentages must be increasing, got {values}.")
    return values


@torch.no_grad()
def masking_curve(
    model: nn.Module | LogitsFn,
    dataloader: Iterable,
    percentages: Iterable[float] = DEFAULT_PERCENTAGES,
    order: str = "saliency",
    fill: str = "mean",
    max_batch_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    max_images: int | None = None,
    attribution: str = "gradient",
    progress: bool = False,
) -> MaskingCurve:
    """Accuracy (%) of ``model`` as the top ``p``% pixels by ``order`` are removed.

    Args:
        model: a classifier (transformers, timm, PEFT, torch) or a ``pixel_values -> logits``
            function. It is put in eval mode.
        dataloader: yields ``{"pixel_values", "labels"}`` dicts or ``(images, labels)``.
        percentages: removal levels in ``[0, 100]``, increasing.
        order: ``"saliency"`` (most salient pixels by ``attribution`` first, MoRF),
            ``"least_salient"`` (least salient first, LeRF: a faithful map keeps the accuracy
            high; together with MoRF under one fill, the shape of the mask cannot carry the
            class, as ROAD argues) or ``"random"``.
        fill: replacement, one of ``MASK_FILLS`` (default ``"mean"``: per-channel image mean).
        max_batch_size: images per forward when masked copies of several levels are
            stacked (default: the dataloader's batch size, one level per forward, which
            measured fastest on CPU; raise it on a large GPU).
        device: where to run (default: the model's device).
        seed: seeds the random order and the ``"random"`` fill.
        max_images: stop after this many images.
        attribution: saliency method for ``order="saliency"``: ``"gradient"`` (default,
            ``|d loss / d x|`` at the true label), ``"integrated_gradients"`` or
            ``"smoothgrad"`` (Captum).
        progress: show a progress bar over batches.
    """
    curves = masking_curves(
        model, dataloader, (order,), percentages, fill, max_batch_size, device, seed, max_images, attribution, progress
    )
    return curves[order]


@torch.no_grad()
def masking_curves(
    model: nn.Module | LogitsFn,
    dataloader: Iterable,
    orders: Iterable[str] = ("saliency", "least_salient"),
    percentages: Iterable[float] = DEFAULT_PERCENTAGES,
    fill: str = "mean",
    max_batch_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    max_images: int | None = None,
    attribution: str = "gradient",
    progress: bool = False,
) -> dict[str, MaskingCurve]:
    """``masking_curve`` for several ``orders`` in one pass over the data: ``{order: curve}``.

    The saliency map of a batch is computed once and ranks the pixels for both ``"saliency"``
    (MoRF) and ``"least_salient"`` (LeRF); each order has its own generator seeded with ``seed``,
    so every curve equals the one ``masking_curve`` gives for that order alone (for the
    ``"gradient"`` attribution).
    """
    orders = tuple(orders)
    percentages = _validate_percentages(percentages)
    for order in orders:
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not supported; use one of {ORDERS}.")
    if fill not in MASK_FILLS:
        raise ValueError(f"fill={fill!r} is not supported; use one of {MASK_FILLS}.")
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution={attribution!r} is not supported; use one of {ATTRIBUTIONS}.")
    forward, device, _ = prepare_for_evaluation(model, device, seed)
    generators = {order: torch.Generator(device=device).manual_seed(seed) for order in orders}
    correct = {order: torch.zeros(len(percentages), dtype=torch.long, device=device) for order in orders}
    ranked = [order for order in orders if order != "random"]  # orders that read the saliency map
    seen = 0
    for batch in maybe_progress(dataloader, progress, f"masking curve ({', '.join(orders)})"):
        images, labels = unpack_batch(batch)
        if max_images is not None:
            remaining = max_images - seen
            if remaining <= 0:
                break
            images, labels = images[:remaining], labels[:remaining]
        images, labels = images.to(device), labels.to(device)
        clean_logits, saliency = None, None
        if ranked and attribution == "gradient":
            grad, clean_logits = input_gradients(forward, images, labels)  # the clean forward comes free
            saliency = pixel_saliency(grad)
        elif ranked:
            saliency = saliency_maps(forward, images, labels, attribution, generators[ranked[0]])
        for order in orders:
            if order == "random":
                scores = saliency_maps(forward, images, labels, "random", generators[order])
            else:
                scores = -saliency if order == "least_salient" else saliency
            correct[order] += _batch_correct(
                forward, images, labels, scores, percentages, fill, max_batch_size, generators[order], clean_logits
            )
        seen += images.shape[0]
    if seen == 0:
        raise ValueError("the dataloader yielded no images; pass a non-empty evaluation set.")
    return {
        order: MaskingCurve(
            percentages, (correct[order].double() * 100.0 / seen).tolist(), order=order, fill=fill, num_images=seen
        )
        for order in orders
    }


SUBSET_SEED = 1234


def random_subset(dataset: Dataset, count: int, seed: int = SUBSET_SEED) -> Dataset:
    """``count`` items of ``dataset`` drawn at random (``seed``), in dataset order; all of it if smaller."""
    from torch.utils.data import Subset

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[: min(count, len(dataset))].tolist()))


def spread_subset(dataloader: Iterable, count: int, seed: int = SUBSET_SEED) -> Iterable:
    """A loader over ``count`` images drawn at random (``seed``) from ``dataloader``'s whole dataset.

    The images keep their dataset order and the loader its batch size and collate function. A
    loader without a sized, map-style dataset (or with at most ``count`` images) is returned as is.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.arange(100.0).view(100, 1), torch.arange(100) // 50)  # class-sorted
        >>> labels = torch.cat([y for _, y in spread_subset(DataLoader(data, batch_size=8), 10)])
        >>> len(labels), sorted(set(labels.tolist()))
        (10, [0, 1])
    """
    from torch.utils.data import DataLoader, IterableDataset

    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return dataloader
    if len(dataset) <= count:
        return dataloader
    return DataLoader(
        random_subset(dataset, count, seed),
        batch_size=getattr(dataloader, "batch_size", None) or 64,
        collate_fn=getattr(dataloader, "collate_fn", None),
        num_workers=getattr(dataloader, "num_workers", 0),
    )


def masking_test_metrics(
    model: nn.Module,
    dataloader: Iterable,
    step: float = 5.0,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    mean_over_processes: Callable[[Tensor], Tensor] | None = None,
    prefix: str = "eval",
) -> dict[str, float]:
    """The masking test during training: ``{prefix}_masking_auc``, ``_masking_auc_random``, ``_faithfulness_gap``.

    Runs the saliency- and random-order curves on ``max_images`` images drawn at random (fixed
    seed ``SUBSET_SEED``: the same images for every model of a comparison) from the whole
    evaluation set, not its first images, which in a class-sorted image folder are all of one
    class; ``mean_over_processes`` (e.g. ``partial(accelerator.reduce, reduction="mean")``)
    averages the AUCs across processes. Restores the model's train/eval mode.
    """
    percentages = percentages_every(step)
    was_training = model.training
    if max_images is not None:
        dataloader = spread_subset(dataloader, max_images)
    common = dict(percentages=percentages, max_images=max_images, device=device)
    try:
        by_saliency = masking_curve(model, dataloader, order="saliency", **common)
        by_random = masking_curve(model, dataloader, order="random", seed=seed, **common)
    finally:
        model.train(was_training)
    aucs = torch.tensor([by_saliency.auc, by_random.auc], device=device)
    if mean_over_processes is not None:
        aucs = mean_over_processes(aucs)
    auc, auc_random = (float(v) for v in aucs)
    return {
        f"{prefix}_masking_auc": auc,
        f"{prefix}_masking_auc_random": auc_random,
        f"{prefix}_faithfulness_gap": faithfulness_gap(auc, auc_random),
    }


def masking_metrics_during_training(
    model: nn.Module,
    dataloader: Iterable,
    masking: MaskingTestArguments,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
    mean_over_processes: Callable[[Tensor], Tensor] | None = None,
    prefix: str = "eval",
) -> dict[str, float]:
    """``masking_test_metrics`` with the settings both training loops take (``MaskingTestArguments``).

    Empty when ``masking.eval_masking_samples`` is 0.
    """
    if masking.eval_masking_samples < 1:
        return {}
    return masking_test_metrics(
        model,
        dataloader,
        step=masking.eval_masking_step,
        max_images=masking.eval_masking_samples,
        device=device,
        seed=seed,
        mean_over_processes=mean_over_processes,
        prefix=prefix,
    )


def _batch_correct(
    forward: LogitsFn,
    images: Tensor,
    labels: Tensor,
    scores: Tensor,
    percentages: list[float],
    fill: str,
    max_batch_size: int | None,
    generator: torch.Generator,
    clean_logits: Tensor | None = None,
) -> Tensor:
    """Correct predictions per level; levels that remove nothing reuse ``clean_logits``."""
    batch, num_pixels = images.shape[0], images.shape[2] * images.shape[3]
    ranks = pixel_ranks(scores).view(batch, 1, *images.shape[2:])
    fill_image = fill_values(images, fill, generator)
    correct = torch.zeros(len(percentages), dtype=torch.long, device=images.device)
    levels = list(range(len(percentages)))
    if clean_logits is not None:
        unchanged = [i for i in levels if _removed_count(percentages[i], num_pixels) == 0]
        clean_correct = (clean_logits.argmax(-1) == labels).sum()
        for i in unchanged:
            correct[i] = clean_correct
        levels = [i for i in levels if i not in unchanged]
    per_chunk = max(1, (max_batch_size or batch) // batch)
    for start in range(0, len(levels), per_chunk):
        chunk = levels[start : start + per_chunk]
        stacked = images.new_empty((len(chunk) * batch, *images.shape[1:]))
        for slot, level in enumerate(chunk):
            removed = ranks < _removed_count(percentages[level], num_pixels)
            torch.where(removed, fill_image, images, out=stacked[slot * batch : (slot + 1) * batch])
        predictions = forward(stacked).argmax(-1).view(len(chunk), batch)
        correct[chunk] = (predictions == labels).sum(1)
    return correct


def maybe_progress(iterable: Iterable, enabled: bool, description: str) -> Iterable:
    """``iterable`` with a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False)


def unpack_batch(batch: object) -> tuple[Tensor, Tensor]:
    """``(pixel_values, labels)`` from a dict batch or an ``(images, labels)`` pair."""
    if isinstance(batch, dict):
        images = batch.get("pixel_values")
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise ValueError("batches must be {'pixel_values', 'labels'} dicts or (images, labels) pairs.")
    if labels is None:
        raise ValueError("the evaluation batches have no labels; the dataset needs a 'labels' (or 'label') column.")
    if images is None:
        raise ValueError("the evaluation batches have no 'pixel_values'.")
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError("pixel_values must be a (B, C, H, W) tensor.")
    if not images.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point to take input gradients, got {images.dtype}; "
            "convert the images with the model's processor or transforms.ToTensor()."
        )
    return images, torch.as_tensor(labels)
