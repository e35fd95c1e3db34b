"""All evaluation metrics of one model on one dataset, as a JSON-ready dict.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from sd_plugin.evaluation.report import evaluate_model
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> data = TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    >>> sorted(evaluate_model(model, data, feature_layer="0", batch_size=4))[:4]
    ['accuracy', 'curves', 'deletion_auc', 'effective_rank']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..collapse import live_feature_fraction
from .attribution import saliency_maps
from .deletion_insertion import deletion_insertion
from .masking_curve import DEFAULT_PERCENTAGES, faithfulness_gap, masking_curve, masking_curves, unpack_batch
from .model_fn import prepare_for_evaluation
from .representation import effective_rank
from .sparseness import sparseness

__all__ = ["accuracy", "evaluate_model", "collect_features", "first_images"]


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
    from ..adapter import adapt

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


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    percentages: tuple[float, ...] = DEFAULT_PERCENTAGES,
    fill: str = "mean",
    attribution: str = "gradient",
    deletion_steps: int = 20,
    max_images: int | None = None,
    sparseness_images: int = 256,
    feature_layer: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy, masking AUC (saliency, random, gap), deletion/insertion, sparseness, effective rank, live features.

    Both removal orders run under one fill: most salient first (``masking_auc``, lower is
    better) and least salient first (``masking_auc_least``, higher is better);
    ``lerf_morf_gap = (AUC_least - AUC_saliency) / AUC_random`` is large only when the map
    ranks the pixels that matter first and those that do not last, so a mask whose shape
    alone gives the class away cannot score it (ROAD, Rong et al. 2022).
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size)
    common = dict(max_images=max_images, seed=seed, progress=progress)
    # MoRF and LeRF rank the pixels by one saliency pass per batch
    ranked = masking_curves(
        model, loader, ("saliency", "least_salient"), percentages, fill, attribution=attribution, **common
    )
    by_saliency, by_least = ranked["saliency"], ranked["least_salient"]
    by_random = masking_curve(model, loader, percentages, "random", fill, **common)
    rise = deletion_insertion(model, loader, steps=deletion_steps, attribution=attribution, **common)
    images, labels = first_images(dataset, min(sparseness_images, len(dataset)))
    device = next(model.parameters()).device
    maps = saliency_maps(model, images.to(device), labels.to(device), attribution)
    features = collect_features(model, loader, feature_layer, max_images)
    return {
        "accuracy": by_saliency.clean_accuracy,
        "masking_auc": by_saliency.auc,
        "masking_auc_normalized": by_saliency.normalized_auc,
        "masking_auc_relative": by_saliency.relative_auc,
        "masking_auc_random": by_random.auc,
        "faithfulness_gap": faithfulness_gap(by_saliency.auc, by_random.auc),
        "masking_auc_least": by_least.auc,
        "lerf_morf_gap": (by_least.auc - by_saliency.auc) / by_random.auc if by_random.auc > 0 else 0.0,
        "deletion_auc": rise.deletion_auc,
        "insertion_auc": rise.insertion_auc,
        "sparseness": float(sparseness(maps).mean()),
        "effective_rank": float(effective_rank(features)),
        "live_features": float(live_feature_fraction(features)),
        "num_features": int(features.shape[1]),
        "num_images": by_saliency.num_images,
        "curves": {
            "saliency": by_saliency.to_dict(),
            "least_salient": by_least.to_dict(),
            "random": by_random.to_dict(),
            "rise": rise.to_dict(),
        },
    }
