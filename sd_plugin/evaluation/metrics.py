"""The one registry of evaluation metrics: name, column title, description and direction.

The ``evaluate`` table, the model card and ``results.json`` all read it, so a metric is
described once. ``higher_is_better`` is ``None`` for a descriptive number (a reference such
as the random-order AUC, or the feature effective rank), as torchmetrics marks direction.

Example:
    >>> METRICS["road_lerf_morf_gap"].higher_is_better
    True
    >>> METRICS["masking_auc"].title
    'MoRF'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["METRICS", "Metric", "RESULT_FIELDS", "TABLE_METRICS", "metric_directions"]


@dataclass(frozen=True)
class Metric:
    key: str
    title: str  # short column title of the evaluate table
    description: str  # the model card's label
    higher_is_better: bool | None
    fmt: str = "{:.3f}"


_ROWS = (
    Metric("accuracy", "acc %", "accuracy (%)", True, "{:.2f}"),
    Metric("masking_auc", "MoRF", "masking AUC, most salient first, mean fill (0-10000)", False, "{:.0f}"),
    Metric("masking_auc_least", "LeRF", "masking AUC, least salient first, mean fill", True, "{:.0f}"),
    Metric("masking_auc_random", "rand", "masking AUC, random order, mean fill (reference)", None, "{:.0f}"),
    Metric("masking_auc_normalized", "MoRF/max", "masking AUC, most salient first, mean fill, over its maximum", False),
    Metric(
        "masking_auc_relative", "MoRF/clean", "masking AUC, most salient first, mean fill, over clean accuracy", False
    ),
    Metric("faithfulness_gap", "gap", "faithfulness gap (AUC_random - AUC_MoRF) / AUC_random, mean fill", True),
    Metric("lerf_morf_gap", "LeRF-MoRF", "(AUC_LeRF - AUC_MoRF) / AUC_random, mean fill", True),
    Metric("road_masking_auc", "ROAD MoRF", "masking AUC, most salient first, ROAD imputation", False, "{:.0f}"),
    Metric("road_masking_auc_least", "ROAD LeRF", "masking AUC, least salient first, ROAD imputation", True, "{:.0f}"),
    Metric("road_masking_auc_random", "ROAD rand", "masking AUC, random order, ROAD imputation", None, "{:.0f}"),
    Metric("road_faithfulness_gap", "ROAD gap", "faithfulness gap under ROAD imputation", True),
    Metric("road_lerf_morf_gap", "ROAD LeRF-MoRF", "(AUC_LeRF - AUC_MoRF) / AUC_random, ROAD imputation", True),
    Metric(
        "blurred_faithfulness_gap", "blur gap", "faithfulness gap of the blurred maps (blur control), mean fill", True
    ),
    Metric("blurred_lerf_morf_gap", "blur LeRF-MoRF", "LeRF-MoRF of the blurred maps (blur control), mean fill", True),
    Metric("blurred_road_lerf_morf_gap", "blur ROAD L-M", "ROAD LeRF-MoRF of the blurred maps (blur control)", True),
    Metric("deletion_auc", "del", "RISE deletion AUC", False),
    Metric("insertion_auc", "ins", "RISE insertion AUC", True),
    Metric("blurred_deletion_auc", "blur del", "RISE deletion AUC of the blurred maps (blur control)", False),
    Metric("blurred_insertion_auc", "blur ins", "RISE insertion AUC of the blurred maps (blur control)", True),
    Metric("relevance_mass", "mass", "relevance mass accuracy on the ground-truth object", True),
    Metric("relevance_rank", "rank", "relevance rank accuracy on the ground-truth object", True),
    Metric("pointing_game", "point", "pointing game on the ground-truth object", True),
    Metric("energy_pointing_game", "energy", "energy pointing game: positive part of the map on the object", True),
    Metric("blurred_relevance_mass", "blur mass", "relevance mass accuracy of the blurred maps (blur control)", True),
    Metric("blurred_relevance_rank", "blur rank", "relevance rank accuracy of the blurred maps (blur control)", True),
    Metric("blurred_pointing_game", "blur point", "pointing game of the blurred maps (blur control)", True),
    Metric("blurred_energy_pointing_game", "blur energy", "energy pointing game of the blurred maps", True),
    Metric("grid_pointing_game", "GridPG", "grid pointing game, all cells (chance 1/n²)", True),
    Metric("grid_pointing_game_correct", "GridPG ok", "grid pointing game, cells whose image alone is correct", True),
    Metric("grid_pointing_game_disconnected", "DiGridPG", "disconnected grid pointing game, all cells", True),
    Metric(
        "grid_pointing_game_disconnected_correct", "DiGridPG ok", "disconnected grid pointing game, correct cells", True
    ),
    Metric("sparseness", "gini", "saliency sparseness (Gini)", True),
    Metric("effective_rank", "erank", "feature effective rank", None, "{:.1f}"),
    Metric("live_features", "live", "fraction of penultimate features alive", True, "{:.0%}"),
)
METRICS: dict[str, Metric] = {metric.key: metric for metric in _ROWS}
# The columns the evaluate command prints (results.json and the card hold every metric).
TABLE_METRICS = (
    "accuracy",
    "faithfulness_gap",
    "lerf_morf_gap",
    "road_lerf_morf_gap",
    "blurred_road_lerf_morf_gap",
    "deletion_auc",
    "insertion_auc",
    "blurred_insertion_auc",
    "relevance_mass",
    "blurred_relevance_mass",
    "relevance_rank",
    "pointing_game",
    "grid_pointing_game",
    "grid_pointing_game_correct",
    "live_features",
)


# The other keys of a model's entry in ``results.json`` (not metrics), and what each holds.
RESULT_FIELDS = {
    "attribution": "the explanation every map-based number is for (evaluate --attribution)",
    "blur_sigma": "the blur control's Gaussian sigma, in pixels",
    "num_images": "images scored",
    "num_features": "width of the penultimate features",
    "curves": "every removal curve ('map|blurred/fill/order', plus 'saliency', 'least_salient', 'random', 'rise'): "
    "levels, accuracy, order, fill, per-image AUCs",
    "per_image": "each image's score of the per-image metrics, in the order of the scored images",
    "source": "the evaluated folder or Hub id",
    "weights_sha256": "fingerprint of the evaluated weights (a folder)",
    "randomization": "the parameter-randomization check (evaluate --randomization)",
    "grid_pointing_game_cells": "the grid pointing game per (grid, cell): scores, correct cells, n, chance, grids",
    "grid_pointing_game_disconnected_cells": "the same for the disconnected variant",
}


def metric_directions() -> dict[str, dict]:
    """``{key: {"title", "description", "higher_is_better"}}`` for ``results.json``."""
    return {
        key: {k: v for k, v in asdict(metric).items() if k not in ("key", "fmt")} for key, metric in METRICS.items()
    }
