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
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..core.arguments import MaskingTestArguments
from ..core.masking import MASK_FILLS, fill_values, num_masked_pixels, pixel_saliency
from ..utils.batches import unpack_batch
from .attribution import (
    Attribution,
    attribution_name,
    blur_maps,
    check_attribution,
    input_gradients,
    saliency_maps,
)
from .imputation import images_per_solve, noisy_linear_impute
from .model_fn import LogitsFn, evaluation_mode, prepare_for_evaluation

__all__ = [
    "CURVE_FILLS",
    "ORDERS",
    "faithfulness_curves",
    "masking_curves",
    "masking_metrics_during_training",
    "batch_count",
    "maybe_progress",
    "progress_bar",
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
# Removal fills of the curves: the training fills, plus ROAD's noisy linear imputation.
CURVE_FILLS = (*MASK_FILLS, "road")


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

    The last level is always 100, so the AUC spans 0-100 whatever the step (a step that does
    not divide 100 ends with a shorter interval).

    Example:
        >>> percentages_every(25)
        (0.0, 25.0, 50.0, 75.0, 100.0)
        >>> percentages_every(30)
        (0.0, 30.0, 60.0, 90.0, 100.0)
    """
    if not 0 < step <= 100:
        raise ValueError(f"step must be in (0, 100] percent, got {step}.")
    levels = [i * float(step) for i in range(int(100 // step) + 1) if i * float(step) < 100 - 1e-9]
    return (*levels, 100.0)


@dataclass
class MaskingCurve:
    """Accuracy (%) after removing the top ``percentages`` (%) of pixels in ``order``."""

    percentages: list[float]
    accuracy: list[float]
    order: str = "saliency"
    fill: str = "mean"
    num_images: int = 0
    extra: dict = field(default_factory=dict)
    per_image_auc: list[float] | None = None  # each image's AUC of 100 x correct(p), dataset order
    attribution: str = "gradient"

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
            "attribution": self.attribution,
            "per_image_auc": self.per_image_auc,
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
    attribution: Attribution = "gradient",
    progress: bool = False,
) -> MaskingCurve:
    """Accuracy (%) of ``model`` as the top ``p``% pixels by ``order`` are removed.

    Args:
        model: a classifier (transformers, timm, PEFT, torch) or a ``pixel_values -> logits``
            function. It runs in eval mode; a module's train/eval modes are restored after.
        dataloader: yields ``{"pixel_values", "labels"}`` dicts or ``(images, labels)``.
        percentages: removal levels in ``[0, 100]``, increasing.
        order: ``"saliency"`` (most salient pixels by ``attribution`` first, MoRF),
            ``"least_salient"`` (least salient first, LeRF: a faithful map keeps the accuracy
            high; together with MoRF under one fill, the shape of the mask cannot carry the
            class, as ROAD argues) or ``"random"``.
        fill: replacement, one of ``CURVE_FILLS`` (default ``"mean"``: per-channel image mean;
            ``"road"``: ROAD's noisy linear imputation from the kept neighbours).
        max_batch_size: images per forward when masked copies of several levels are
            stacked (default: the dataloader's batch size, one level per forward, which
            measured fastest on CPU; raise it on a large GPU).
        device: where to run (default: the model's device).
        seed: seeds the random order, the ``"random"`` fill and ROAD's noise.
        max_images: stop after this many images.
        attribution: what ranks the pixels for the saliency orders: a name of
            ``attribution.ATTRIBUTIONS`` (default ``"gradient"``, ``|d CE / d x|`` at the true
            label), a function ``f(model, images, labels) -> maps``, ``PrecomputedMaps`` or
            ``blurred(...)``.
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
    attribution: Attribution = "gradient",
    progress: bool = False,
) -> dict[str, MaskingCurve]:
    """``masking_curve`` for several ``orders`` in one pass over the data: ``{order: curve}``.

    The saliency map of a batch is computed once and ranks the pixels for both ``"saliency"``
    (MoRF) and ``"least_salient"`` (LeRF); each order has its own generator seeded with ``seed``,
    so every curve equals the one ``masking_curve`` gives for that order alone (for the
    ``"gradient"`` attribution).
    """
    curves = faithfulness_curves(
        model,
        dataloader,
        orders,
        percentages,
        (fill,),
        attribution,
        None,
        max_batch_size,
        device,
        seed,
        max_images,
        progress,
    )
    return {order: curves["map", fill, order] for order in orders}


CurveKey = tuple[str, str, str]  # (maps: "map" | "blurred", fill, order)


@torch.no_grad()
def faithfulness_curves(
    model: nn.Module | LogitsFn,
    dataloader: Iterable,
    orders: Iterable[str] = ORDERS,
    percentages: Iterable[float] = DEFAULT_PERCENTAGES,
    fills: Iterable[str] = ("mean", "road"),
    attribution: Attribution = "gradient",
    blur_sigma: float | None = None,
    max_batch_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    max_images: int | None = None,
    progress: bool = False,
) -> dict[CurveKey, MaskingCurve]:
    """Every removal curve of one model in one pass: ``{(maps, fill, order): curve}``.

    ``maps`` is ``"map"`` (the attribution's maps) or, with ``blur_sigma``, ``"blurred"`` (the
    same maps Gaussian-blurred, the blur control; the random order has no ``"blurred"`` key: it
    reads no map). The attribution runs once per batch and every curve keeps per-image AUCs.
    Each curve has its own generator seeded with ``seed``: it equals ``masking_curve`` alone.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> data = DataLoader(TensorDataset(torch.randn(6, 3, 8, 8), torch.tensor([0, 1] * 3)), batch_size=3)
        >>> curves = faithfulness_curves(model, data, percentages=[0, 50, 100], blur_sigma=1.0)
        >>> sorted(curves)[:3]
        [('blurred', 'mean', 'least_salient'), ('blurred', 'mean', 'saliency'), ('blurred', 'road', 'least_salient')]
        >>> len(curves["map", "road", "saliency"].per_image_auc)
        6
    """
    orders, fills = tuple(orders), tuple(fills)
    percentages = _validate_percentages(percentages)
    for order in orders:
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not supported; use one of {ORDERS}.")
    for fill in fills:
        if fill not in CURVE_FILLS:
            raise ValueError(f"fill={fill!r} is not supported; use one of {CURVE_FILLS}.")
    check_attribution(attribution)
    if blur_sigma is not None and blur_sigma <= 0:
        raise ValueError(f"blur_sigma={blur_sigma} must be > 0 pixels (or None for no blur control).")
    variants = ("map", "blurred") if blur_sigma is not None else ("map",)
    keys = [
        (variant, fill, order)
        for variant in variants
        for fill in fills
        for order in orders
        if not (variant == "blurred" and order == "random")
    ]
    with evaluation_mode(model):
        forward, device, _ = prepare_for_evaluation(model, device, seed)
        generators = {key: torch.Generator(device=device).manual_seed(seed) for key in keys}
        correct: dict[CurveKey, list[Tensor]] = {key: [] for key in keys}
        seen = 0
        batches = batch_count(dataloader, max_images)
        bar = progress_bar(
            None if batches is None else batches * len(keys),
            progress,
            f"removal curves ({len(keys)} per batch)",
            "curve",
        )
        for batch in dataloader:
            images, labels = unpack_batch(batch)
            if max_images is not None:
                if max_images - seen <= 0:
                    break
                images, labels = images[: max_images - seen], labels[: max_images - seen]
            images, labels = images.to(device), labels.to(device)
            maps, clean_logits = _batch_maps(model, forward, images, labels, orders, attribution, generators, seen)
            if blur_sigma is not None and maps is not None:
                maps = {"map": maps, "blurred": blur_maps(maps, blur_sigma)}
            else:
                maps = {"map": maps}
            for key in keys:
                variant, fill, order = key
                if order == "random":
                    scores = saliency_maps(forward, images, labels, "random", generators[key])
                else:
                    scores = -maps[variant] if order == "least_salient" else maps[variant]
                correct[key].append(
                    _batch_correct(
                        forward,
                        images,
                        labels,
                        scores,
                        percentages,
                        fill,
                        max_batch_size,
                        generators[key],
                        clean_logits,
                    )
                )
                bar.update()
            seen += images.shape[0]
        bar.close()
    if seen == 0:
        raise ValueError("the dataloader yielded no images; pass a non-empty evaluation set.")
    name = attribution_name(attribution)
    return {key: _curve(torch.cat(correct[key], 1), percentages, key, seen, name, blur_sigma) for key in keys}


def _batch_maps(model, forward, images, labels, orders, attribution, generators, offset):
    """The batch's saliency maps (None when no order reads them) and the clean logits when they come free."""
    if all(order == "random" for order in orders):
        return None, None
    if attribution == "gradient":
        grad, clean_logits = input_gradients(forward, images, labels)  # the clean forward comes free
        return pixel_saliency(grad), clean_logits
    generator = next(iter(generators.values()))
    return saliency_maps(model, images, labels, attribution, generator, offset=offset), None


def _curve(
    correct: Tensor, percentages: list[float], key: CurveKey, seen: int, attribution: str, blur_sigma: float | None
) -> MaskingCurve:
    """A curve from the ``(levels, images)`` correctness of one key, with each image's AUC."""
    variant, fill, order = key
    accuracy = (correct.double().sum(1) * 100.0 / seen).tolist()
    levels = torch.tensor(percentages, dtype=torch.float64, device=correct.device)
    scores = correct.double() * 100.0
    per_image = ((levels[1:] - levels[:-1]).view(-1, 1) * (scores[1:] + scores[:-1]) / 2).sum(0)
    if order == "random":
        attribution = "random"
    elif variant == "blurred":
        attribution = f"{attribution}, blurred sigma={blur_sigma:g}px"
    return MaskingCurve(
        percentages,
        accuracy,
        order=order,
        fill=fill,
        num_images=seen,
        per_image_auc=per_image.tolist(),
        attribution=attribution,
    )


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
    """``(levels, B)`` correctness; levels that remove nothing reuse ``clean_logits`` (or one clean forward).

    With ``fill="road"`` the imputation of every level of a chunk is one batched solve, the chunk
    filling one solve (``images_per_solve``) even when the forwards take fewer levels (a 28 px grey
    batch of 64 solves 18 levels at once; a 224 px RGB level is split into solves of 6 images).
    """
    batch, num_pixels = images.shape[0], images.shape[2] * images.shape[3]
    ranks = pixel_ranks(scores).view(batch, *images.shape[2:])
    fill_image = None if fill == "road" else fill_values(images, fill, generator)
    correct = torch.zeros(len(percentages), batch, dtype=torch.bool, device=images.device)
    levels = list(range(len(percentages)))
    unchanged = [i for i in levels if _removed_count(percentages[i], num_pixels) == 0]
    if unchanged:  # levels that remove nothing score the clean images (no fill drawn for them)
        clean_logits = forward(images) if clean_logits is None else clean_logits
        correct[unchanged] = clean_logits.argmax(-1) == labels
        levels = [i for i in levels if i not in unchanged]
    per_forward = max(1, (max_batch_size or batch) // batch)
    per_chunk = per_forward
    if fill == "road":  # one solve over several forwards' levels amortises its fixed cost on small images
        per_chunk = max(per_forward, images_per_solve(*images.shape[1:]) // batch)
    for start in range(0, len(levels), per_chunk):
        chunk = levels[start : start + per_chunk]
        removed = torch.cat([ranks < _removed_count(percentages[level], num_pixels) for level in chunk])
        stacked = images.repeat(len(chunk), 1, 1, 1)
        if fill == "road":
            stacked = noisy_linear_impute(stacked, removed, generator=generator)
        else:
            stacked = torch.where(removed.unsqueeze(1), fill_image.repeat(len(chunk), 1, 1, 1), stacked)
        for offset in range(0, len(chunk), per_forward):
            part = chunk[offset : offset + per_forward]
            logits = forward(stacked[offset * batch : (offset + len(part)) * batch])
            correct[part] = logits.argmax(-1).view(len(part), batch) == labels
    return correct


def maybe_progress(iterable: Iterable, enabled: bool, description: str) -> Iterable:
    """``iterable`` with a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False)


class _NoProgress:
    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, enabled: bool, description: str, unit: str = "it") -> Any:
    """A tqdm bar of ``total`` work units advanced by ``update()`` (a no-op object when not ``enabled``).

    A stage whose batch holds many units (every curve of a batch, every deletion level) advances
    per unit, so a small evaluation set (one batch) still shows it moving.
    """
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, leave=False)


def batch_count(dataloader: Iterable, max_images: int | None = None) -> int | None:
    """How many batches an evaluation reads from ``dataloader`` (``None`` when it cannot tell).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=4)
        >>> batch_count(loader), batch_count(loader, max_images=5)
        (3, 2)
    """
    try:
        count = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None
    batch_size = getattr(dataloader, "batch_size", None)
    if max_images is not None and batch_size:
        count = min(count, -(-max_images // batch_size))
    return count


def unpack_masks(batch: object) -> Tensor | None:
    """The ground-truth ``(B, H, W)`` masks of a batch (a ``"masks"`` key or a third element), or None."""
    if isinstance(batch, dict):
        masks = batch.get("masks")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 3:
        masks = batch[2]
    else:
        masks = None
    if masks is None:
        return None
    masks = torch.as_tensor(masks)
    if masks.dim() == 4:
        masks = masks[:, 0]
    return masks.bool()
