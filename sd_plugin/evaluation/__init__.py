"""Faithfulness and representation metrics for any image classifier."""

from .attribution import Explainer, input_gradients, saliency_maps
from .grid_pointing_game import grid_pointing_game, make_grids
from .masking_curve import DEFAULT_PERCENTAGES, MaskingCurve, faithfulness_gap, masking_auc, masking_curve
from .model_fn import LogitsModel, logits_fn
from .report import evaluate_model

__all__ = [
    "DEFAULT_PERCENTAGES",
    "Explainer",
    "LogitsModel",
    "MaskingCurve",
    "evaluate_model",
    "faithfulness_gap",
    "grid_pointing_game",
    "input_gradients",
    "logits_fn",
    "make_grids",
    "masking_auc",
    "masking_curve",
    "saliency_maps",
]
