"""A forward hook that records (and optionally whitens) the penultimate features.

The tap sits on the classifier head's input (or on the output of a named feature
layer). On each forward it records the features ``f``; when a ``GroupZCA`` is attached
and ``whiten_head_input`` is on, it hands ``z = GroupZCA(f)`` to the head instead of
``f`` (the paper's CNN variant) on every forward, so ``model(x)`` whitens in training,
in evaluation and in the masked pass alike. Otherwise (the paper's ViT variant) the tap only
records ``f``, and the training step whitens it for the decorrelation loss.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .whitening import GroupZCA

__all__ = ["FeatureTap", "WHITENING_MODULE_NAME", "is_whitening_key"]

WHITENING_MODULE_NAME = "saliency_decor_whitening"


def is_whitening_key(key: str) -> bool:
    """True for a state-dict key of the whitening's buffers (at any depth of wrapping)."""
    return WHITENING_MODULE_NAME in key.split(".")


class FeatureTap:
    """Records ``features`` / ``whitened`` of the last forward pass of ``module``.

    Args:
        module: the head (``where="input"``) or the feature layer (``where="output"``).
        where: ``"input"`` to tap the module's first positional input, ``"output"`` for
            its output. Shapes ``(B, D)`` and ``(B, D, 1, 1)`` are accepted, and ``(B, D, h, w)``
            maps at the input of a B-cos head that pools after itself (``core.bcos``).
        module_name: used in error messages.
    """

    def __init__(self, module: nn.Module, where: str, module_name: str) -> None:
        if where not in ("input", "output"):
            raise ValueError(f"where must be 'input' or 'output', got {where!r}.")
        self.module = module
        self.where = where
        self.module_name = module_name
        self.whitening: GroupZCA | None = None
        self.whiten_head_input = False
        self.features: Tensor | None = None
        self.whitened: Tensor | None = None
        if where == "input":
            self._handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = module.register_forward_hook(self._post_hook)

    def remove(self) -> None:
        """Detach the hook from the model."""
        self._handle.remove()

    def clear(self) -> None:
        self.features = None
        self.whitened = None

    def _transform(self, value: Tensor) -> Tensor | None:
        if not isinstance(value, Tensor):
            raise TypeError(f"the tapped value of {self.module_name!r} is a {type(value).__name__}, not a tensor.")
        shape = value.shape
        if value.dim() == 4 and shape[2] == 1 and shape[3] == 1:
            flat = value.flatten(1)
        elif value.dim() == 2:
            flat = value
        elif value.dim() == 4 and self.where == "input" and getattr(self.module, "pool_after", False):
            # a B-cos head applied before the pooling (core.bcos): the features are the map's spatial mean
            self.features, self.whitened = value.mean(dim=(2, 3)), None
            return None
        else:
            raise ValueError(
                f"the features at {self.module_name!r} ({self.where}) have shape {tuple(shape)}; "
                "expected (B, D) penultimate features. Pass feature_layer='<module whose output "
                "is the pooled (B, D) features>'."
            )
        self.features = flat
        self.whitened = None
        if self.whitening is None or not self.whiten_head_input:
            return None
        whitened = self.whitening(flat)
        self.whitened = whitened
        return whitened.view(shape)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        replacement = self._transform(args[0])
        if replacement is None:
            return None
        return (replacement, *args[1:])

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self._transform(output)
