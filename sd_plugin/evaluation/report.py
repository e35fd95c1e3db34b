"""All evaluation metrics of one model on one dataset, as a JSON-ready dict.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from sd_plugin.evaluation.report import evaluate_model
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> data = TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    >>> results = evaluate_model(model, data, feature_layer="0", batch_size=4)
    >>> [key in results for key in ("road_lerf_morf_gap", "blurred_lerf_morf_gap", "per_image")]
    [True, True, True]
    >>> len(results["per_image"]["road_masking_auc"])
    8
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.collapse import live_feature_fraction
from ..utils.batches import unpack_batch
from .attribution import Attribution, PrecomputedMaps, attribution_name, blur_maps, blurred, saliency_maps
from .deletion_insertion import deletion_insertion
from .localization import localization_scores
from .masking_curve import (
    DEFAULT_PERCENTAGES,
    ORDERS,
    faithfulness_curves,
    faithfulness_gap,
    maybe_progress,
    random_subset,
    unpack_masks,
)
from .model_fn import evaluation_mode, prepare_for_evaluation
from .representation import effective_rank
from .sparseness import sparseness

__all__ = [
    "accuracy",
    "collect_features",
    "evaluate_model",
    "finite_mean",
    "first_images",
    "localization_metrics",
    "precompute_maps",
    "removal_metrics",
]


def first_images(dataset: Dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images and labels of ``dataset`` as tensors."""
    loader = DataLoader(dataset, batch_size=count)
    return unpack_batch(next(iter(loader)))


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy (%) of ``model`` over ``loader``: one no-grad forward per batch."""
    forward, device, _ = prepare_for_evaluation(model, None, 0)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for batch in loader:
        images, labels = unpack_batch(batch)
        correct += (forward(images.to(device)).argmax(-1) == labels.to(device)).sum()
        seen += labels.numel()
    if seen == 0:
        raise ValueError("the dataloader yielded no images; pass a non-empty evaluation set.")
    return 100.0 * float(correct) / seen


@torch.no_grad()
def collect_features(
    model: nn.Module, loader: DataLoader, feature_layer: str | None = None, max_images: int | None = None
) -> torch.Tensor:
    """Penultimate features ``(N, D)`` of the images in ``loader`` (eval mode)."""
    from ..core.adapter import adapt

    device = next(model.parameters()).device
    example, _ = unpack_batch(next(iter(loader)))
    adapter = adapt(model, feature_layer=feature_layer, example_inputs=example.to(device))
    chunks, seen = [], 0
    try:
        for batch in loader:
            images, _ = unpack_batch(batch)
            if max_images is not None and seen >= max_images:
                break
            _, features = adapter.forward_with_features(model, images.to(device))
            chunks.append(features.float().cpu())
            seen += images.shape[0]
    finally:
        adapter.remove()
    return torch.cat(chunks)[:max_images]


def finite_mean(values: list[float]) -> float:
    """The mean of the scores that are not NaN (an image without a mask scores NaN); NaN if none is."""
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def _gap(low: float, high: float, reference: float) -> float:
    return (high - low) / reference if reference > 0 else 0.0


def removal_metrics(curves: dict, fill: str, variant: str = "map", prefix: str = "") -> dict[str, float]:
    """AUCs, faithfulness gap and LeRF−MoRF gap of one fill's curves from ``faithfulness_curves``."""
    morf, lerf = curves[variant, fill, "saliency"], curves[variant, fill, "least_salient"]
    random = curves["map", fill, "random"]
    return {
        f"{prefix}masking_auc": morf.auc,
        f"{prefix}masking_auc_least": lerf.auc,
        f"{prefix}masking_auc_random": random.auc,
        f"{prefix}faithfulness_gap": faithfulness_gap(morf.auc, random.auc),
        f"{prefix}lerf_morf_gap": _gap(morf.auc, lerf.auc, random.auc),
    }


@torch.no_grad()
def localization_metrics(
    model: nn.Module,
    loader: DataLoader,
    attribution: Attribution = "gradient",
    blur_sigma: float | None = 2.0,
    max_images: int | None = None,
    progress: bool = False,
) -> dict[str, list[float]] | None:
    """Per-image relevance mass / rank and pointing game (and their blur control); None without masks."""
    _, device, generator = prepare_for_evaluation(model, None, 0)
    scores: dict[str, list[float]] = {}
    seen = 0
    for batch in maybe_progress(loader, progress, "localization (masks)"):
        masks = unpack_masks(batch)
        if masks is None:
            return None
        images, labels = unpack_batch(batch)
        if max_images is not None:
            if seen >= max_images:
                break
            images, labels, masks = images[: max_images - seen], labels[: max_images - seen], masks[: max_images - seen]
        images, labels, masks = images.to(device), labels.to(device), masks.to(device)
        maps = saliency_maps(model, images, labels, attribution, generator, offset=seen)
        variants = {"": maps, "blurred_": blur_maps(maps, blur_sigma)} if blur_sigma else {"": maps}
        for prefix, values in variants.items():
            for name, per_image in localization_scores(values, masks).items():
                scores.setdefault(prefix + name, []).extend(per_image)
        seen += images.shape[0]
    return scores or None


# Attributions whose maps are a function of the model and the image alone: computed once, reused by
# every metric. "random" and "smoothgrad" draw from the evaluation's generator, so each metric draws its own.
_REUSABLE = ("gradient", "logit_gradient", "input_x_gradient", "integrated_gradients", "gradcam", "native")
MAX_REUSED_MAP_BYTES = 1 << 30  # both sets of maps above this: recomputed per metric, not held in memory


def _reusable(attribution: Attribution) -> bool:
    return attribution in _REUSABLE if isinstance(attribution, str) else callable(attribution)


@torch.no_grad()
def precompute_maps(
    model: nn.Module,
    dataset: Dataset,
    count: int,
    batch_size: int,
    attribution: Attribution = "gradient",
    at_prediction: bool = False,
    progress: bool = False,
) -> PrecomputedMaps:
    """The first ``count`` images' maps, in dataset order, held on the host for every metric to read.

    The maps explain the true label, or with ``at_prediction`` the predicted class (what RISE
    deletion / insertion explains).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> data = TensorDataset(torch.randn(5, 1, 4, 4), torch.zeros(5, dtype=torch.long))
        >>> precompute_maps(model, data, 4, batch_size=3).maps.shape
        torch.Size([4, 4, 4])
    """
    forward, device, generator = prepare_for_evaluation(model, None, 0)
    maps, seen = [], 0
    target = "predictions" if at_prediction else "labels"
    for batch in maybe_progress(DataLoader(dataset, batch_size=batch_size), progress, f"maps of the {target}"):
        if seen >= count:
            break
        images, labels = unpack_batch(batch)
        images, labels = images[: count - seen].to(device), labels[: count - seen].to(device)
        if at_prediction:
            labels = forward(images).argmax(-1)
        with torch.enable_grad():
            maps.append(saliency_maps(model, images, labels, attribution, generator, offset=seen).cpu())
        seen += images.shape[0]
    return PrecomputedMaps(torch.cat(maps), name=attribution_name(attribution))


def _maps_of_subset(attribution: Attribution, indices: list[int]) -> Attribution:
    """Precomputed maps of a whole dataset, cut to the images of its subset ``indices``."""
    if isinstance(attribution, blurred):
        return blurred(_maps_of_subset(attribution.attribution, indices), attribution.sigma)
    if not isinstance(attribution, PrecomputedMaps):
        return attribution
    if attribution.maps.shape[0] <= max(indices):
        raise ValueError(
            f"attribution: {attribution.maps.shape[0]} precomputed maps for a dataset of more images; with max_images "
            "the evaluation draws a class-spread subset, so pass one map per image of the whole dataset (or pass the "
            "subset's images and their maps, and no max_images)."
        )
    return PrecomputedMaps(attribution.maps[list(indices)], attribution.name)


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    percentages: tuple[float, ...] = DEFAULT_PERCENTAGES,
    fill: str = "mean",
    attribution: Attribution = "gradient",
    deletion_steps: int = 20,
    max_images: int | None = None,
    sparseness_images: int = 256,
    feature_layer: str | None = None,
    seed: int = 0,
    progress: bool = False,
    road: bool = True,
    blur_sigma: float | None = 2.0,
    reuse_maps: bool = True,
) -> dict[str, Any]:
    """Every metric of ``METRICS`` for one model on one dataset, with per-image scores.

    Both removal orders run under one fill: most salient first (``masking_auc``, lower is
    better) and least salient first (``masking_auc_least``, higher is better);
    ``lerf_morf_gap = (AUC_least - AUC_saliency) / AUC_random`` is large only when the map
    ranks the pixels that matter first and those that do not last, so a mask whose shape
    alone gives the class away cannot score it (ROAD, Rong et al. 2022). With ``road`` the
    same curves run under ROAD's noisy linear imputation (``road_*``), which a model trained on
    mean- or random-filled masks has not seen. With ``blur_sigma`` every faithfulness metric is
    also computed for the same maps Gaussian-blurred (``blurred_*``): the blur control. When the
    dataset yields ``masks`` (``LocalizationDataset``), relevance mass / rank accuracy and the
    pointing game are added. ``per_image`` holds each image's score of the per-image metrics in
    dataset order, so two models scored on the same images can be compared image by image.
    ``max_images`` scores a seeded subset spread over the dataset (``masking_curve.random_subset``:
    the images ``evaluate --max-images`` scores, the same for every model), not its first images.
    With ``reuse_maps`` (and a deterministic attribution: the gradients, Integrated Gradients, a
    function) each image's map is computed once for its label and once for its predicted class
    (RISE's target), and every metric reads those (the blurred control blurs them); ``False``
    recomputes the maps per metric, with the same results.
    """
    if max_images is not None and max_images < len(dataset):
        # the seeded, class-spread subset `evaluate --max-images` scores (one function for both)
        dataset = random_subset(dataset, max_images)
        attribution = _maps_of_subset(attribution, dataset.indices)
    loader = DataLoader(dataset, batch_size=batch_size)
    common = dict(max_images=max_images, seed=seed, progress=progress)
    attribution_label = attribution_name(attribution)
    with evaluation_mode(model):
        evaluated = len(dataset) if max_images is None else min(max_images, len(dataset))
        count = max(evaluated, min(sparseness_images, len(dataset)))
        height, width = first_images(dataset, 1)[0].shape[-2:]
        explain_prediction = attribution  # RISE explains the predicted class, every other metric the label
        if reuse_maps and _reusable(attribution) and 2 * count * height * width * 4 <= MAX_REUSED_MAP_BYTES:
            explain_prediction = precompute_maps(
                model, dataset, evaluated, batch_size, attribution, at_prediction=True, progress=progress
            )
            attribution = precompute_maps(model, dataset, count, batch_size, attribution, progress=progress)
        fills = (fill, "road") if road and fill != "road" else (fill,)
        curves = faithfulness_curves(model, loader, ORDERS, percentages, fills, attribution, blur_sigma, **common)
        rise = deletion_insertion(model, loader, steps=deletion_steps, attribution=explain_prediction, **common)
        images, labels = first_images(dataset, min(sparseness_images, len(dataset)))
        device = next(model.parameters()).device
        maps = saliency_maps(model, images.to(device), labels.to(device), attribution)  # precomputed: a slice
        features = collect_features(model, loader, feature_layer, max_images)
        located = localization_metrics(model, loader, attribution, blur_sigma, max_images, progress)
        blurred_rise = None
        if blur_sigma is not None:
            blurred_rise = deletion_insertion(
                model, loader, steps=deletion_steps, attribution=blurred(explain_prediction, blur_sigma), **common
            )
    by_saliency = curves["map", fill, "saliency"]
    metrics: dict[str, Any] = {"accuracy": by_saliency.clean_accuracy}
    metrics.update(removal_metrics(curves, fill, "map", ""))
    metrics["masking_auc_normalized"] = by_saliency.normalized_auc
    metrics["masking_auc_relative"] = by_saliency.relative_auc
    per_image = {
        "masking_auc": by_saliency.per_image_auc,
        "masking_auc_least": curves["map", fill, "least_salient"].per_image_auc,
        "deletion_auc": rise.per_image_deletion_auc,
        "insertion_auc": rise.per_image_insertion_auc,
    }
    if road:
        metrics.update(removal_metrics(curves, "road", "map", "road_"))
        per_image["road_masking_auc"] = curves["map", "road", "saliency"].per_image_auc
        per_image["road_masking_auc_least"] = curves["map", "road", "least_salient"].per_image_auc
    if blur_sigma is not None:
        blurred_removal = removal_metrics(curves, fill, "blurred", "blurred_")
        metrics["blurred_faithfulness_gap"] = blurred_removal["blurred_faithfulness_gap"]
        metrics["blurred_lerf_morf_gap"] = blurred_removal["blurred_lerf_morf_gap"]
        if road:
            road_blurred = removal_metrics(curves, "road", "blurred", "blurred_road_")
            metrics["blurred_road_lerf_morf_gap"] = road_blurred["blurred_road_lerf_morf_gap"]
        metrics["blurred_deletion_auc"] = blurred_rise.deletion_auc
        metrics["blurred_insertion_auc"] = blurred_rise.insertion_auc
        metrics["blur_sigma"] = blur_sigma
    metrics["deletion_auc"] = rise.deletion_auc
    metrics["insertion_auc"] = rise.insertion_auc
    if located:
        for name, values in located.items():
            metrics[name] = finite_mean(values)
        per_image.update(located)
    metrics.update(
        {
            "sparseness": float(sparseness(maps).mean()),
            "effective_rank": float(effective_rank(features)),
            "live_features": float(live_feature_fraction(features)),
            "num_features": int(features.shape[1]),
            "num_images": by_saliency.num_images,
            "attribution": attribution_label,
            "curves": {
                f"{variant}/{curve_fill}/{order}": curve.to_dict()
                for (variant, curve_fill, order), curve in curves.items()
            },
            "per_image": per_image,
        }
    )
    metrics["curves"]["saliency"] = by_saliency.to_dict()  # the names figures and older readers use
    metrics["curves"]["least_salient"] = curves["map", fill, "least_salient"].to_dict()
    metrics["curves"]["random"] = curves["map", fill, "random"].to_dict()
    metrics["curves"]["rise"] = rise.to_dict()
    return metrics
