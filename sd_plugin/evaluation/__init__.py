"""Faithfulness and representation metrics for any image classifier."""

from .attribution import input_gradients, saliency_maps
from .masking_curve import DEFAULT_PERCENTAGES, MaskingCurve, faithfulness_gap, masking_auc, masking_curve
from .model_fn import logits_fn

__all__ = [
    "DEFAULT_PERCENTAGES",
    "MaskingCurve",
    "faithfulness_gap",
    "input_gradients",
    "logits_fn",
    "masking_auc",
    "masking_curve",
    "saliency_maps",
]
