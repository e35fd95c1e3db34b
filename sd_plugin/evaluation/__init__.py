"""Faithfulness and representation metrics for any image classifier."""

from .attribution import input_gradients, saliency_maps
from .masking_curve import DEFAULT_PERCENTAGES, MaskingCurve, faithfulness_gap, masking_auc, masking_curve
from .model_fn import LogitsModel, logits_fn
from .report import evaluate_model

__all__ = [
    "DEFAULT_PERCENTAGES",
    "LogitsModel",
    "MaskingCurve",
    "evaluate_model",
    "faithfulness_gap",
    "input_gradients",
    "logits_fn",
    "masking_auc",
    "masking_curve",
    "saliency_maps",
]
