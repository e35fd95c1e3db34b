"""Deprecated module (0.1 names): ``SaliencyDecorLoss`` is ``sd_plugin.training_step.SaliencyDecorStep``.

Kept for one release; the choice sets live in ``sd_plugin.choices``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .adapter import ModelAdapter
from .arguments import SaliencyDecorArguments
from .choices import CONSISTENCY_GRADS, DECOR_TARGETS, METHODS, SALIENCY_TARGETS
from .errors import NonFiniteLossError
from .training_step import SaliencyDecorOutput, SaliencyDecorStep

__all__ = [
    "METHODS",
    "CONSISTENCY_GRADS",
    "DECOR_TARGETS",
    "SALIENCY_TARGETS",
    "SaliencyDecorLoss",
    "SaliencyDecorOutput",
    "NonFiniteLossError",
]


class SaliencyDecorLoss(SaliencyDecorStep):
    """Deprecated alias of ``SaliencyDecorStep`` taking the method fields as keyword arguments.

    ``SaliencyDecorLoss(adapter, group_size=8)`` is
    ``SaliencyDecorStep(adapter, SaliencyDecorArguments(group_size=8))``.
    """

    def __init__(self, adapter: ModelAdapter, generator: torch.Generator | None = None, **method_fields: Any) -> None:
        warnings.warn(
            "SaliencyDecorLoss is deprecated and will be removed in 0.2; use "
            "SaliencyDecorStep(adapter, SaliencyDecorArguments(...)).",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(adapter, SaliencyDecorArguments(**method_fields), generator=generator)
