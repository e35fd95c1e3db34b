"""Fold the running whitening into the classifier head: zero inference overhead.

``head(W (f - mu)) = (A W) f + (b - A W mu)`` with ``W`` the block-diagonal eval-mode
whitening matrix, so the exported model is the plain architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .feature_tap import WHITENING_MODULE_NAME, FeatureTap
from .whitening import GroupZCA, inverse_sqrt_psd, shrink_covariance

__all__ = [
    "FoldedHead",
    "block_diagonal_whitening",
    "find_whitening",
    "fold_whitening_into_head",
    "folded_head",
    "head_fed_by",
    "strip_sd_hooks",
]

_FOLDABLE_BEFORE_LINEAR = (nn.Flatten, nn.Dropout, nn.Identity)


def find_whitening(model: nn.Module) -> tuple[nn.Module, GroupZCA] | None:
    """``(owner, GroupZCA)`` of the ``saliency_decor_whitening`` submodule, or None."""
    for module in model.modules():
        whitening = module._modules.get(WHITENING_MODULE_NAME)  # not getattr: PEFT forwards attributes
        if isinstance(whitening, GroupZCA):
            return module, whitening
    return None


def strip_sd_hooks(model: nn.Module) -> None:
    """Remove every feature-tap hook (e.g. from a deep copy of a trained model)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), FeatureTap)]:
                del hooks[key]


@torch.no_grad()
def block_diagonal_whitening(whitening: GroupZCA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, mu)`` in float64: the eval-mode whitening as one ``D x D`` block-diagonal matrix."""
    blocks = inverse_sqrt_psd(
        shrink_covariance(whitening.running_cov.double(), whitening.shrinkage, whitening.eps),
        whitening.method,
        whitening.ns_iterations,
    )
    return torch.block_diag(*blocks), whitening.running_mean.double()


def _head_linear(head: nn.Module, name: str) -> nn.Linear:
    copies = getattr(head, "modules_to_save", None)  # PEFT ModulesToSaveWrapper: the trained copy
    if isinstance(copies, nn.ModuleDict) and len(copies):
        head = next(iter(copies.values()))
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential):
        modules = list(head)
        linear_positions = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
        if linear_positions:
            first = linear_positions[0]
            if all(isinstance(m, _FOLDABLE_BEFORE_LINEAR) for m in modules[:first]):
                return modules[first]
    raise ValueError(
        f"cannot fold the whitening into head {name!r} ({type(head).__name__}): only a Linear, or a "
        "Sequential of Flatten/Dropout then Linear, can absorb it. Train with whiten_head_input=False "
        "for this model, or keep using it through sd_plugin.storage.loading.load_classifier."
    )


@dataclass(frozen=True)
class FoldedHead:
    """The head ``Linear`` a whitening feeds, with its weight and bias after folding."""

    linear: nn.Linear
    weight: torch.Tensor
    bias: torch.Tensor


def head_fed_by(model: nn.Module) -> tuple[GroupZCA, nn.Linear] | None:
    """``(whitening, head Linear)`` when the model's whitening feeds its head, else None.

    Raises ``ValueError`` when the whitening feeds a head that cannot absorb it (see
    ``fold_whitening_into_head``).
    """
    found = find_whitening(model)
    if found is None or not found[1].feeds_head:
        return None
    owner, whitening = found
    if whitening.tap_where != "input" or not whitening.tap_module_name:
        raise ValueError(
            f"the whitening sits on the output of feature_layer={whitening.tap_module_name!r}; only a whitening "
            "on the head's input can be folded. Export through sd_plugin.storage.loading.load_classifier instead."
        )
    linear = _head_linear(owner.get_submodule(whitening.tap_module_name), whitening.tap_module_name)
    if linear.bias is None:
        raise ValueError(f"head {whitening.tap_module_name!r} has no bias to absorb the whitening's mean.")
    return whitening, linear


@torch.no_grad()
def folded_head(model: nn.Module) -> FoldedHead | None:
    """The head's weight and bias with the eval-mode whitening folded in; the model is unchanged.

    None when no whitening feeds the head. ``head(W (f - mu))`` equals
    ``folded.weight @ f + folded.bias`` for every feature vector ``f``.
    """
    found = head_fed_by(model)
    if found is None:
        return None
    whitening, linear = found
    weight_matrix, mean = block_diagonal_whitening(whitening)
    device = linear.weight.device
    weight = linear.weight.double() @ weight_matrix.to(device)  # W is symmetric per block
    bias = linear.bias.double() - weight @ mean.to(device)
    return FoldedHead(linear, weight.to(linear.weight.dtype), bias.to(linear.bias.dtype))


@torch.no_grad()
def fold_whitening_into_head(model: nn.Module) -> bool:
    """Fold and remove the whitening of ``model`` (in place); False if there is none to fold.

    Raises ``ValueError`` when the whitening fed the head but was never estimated (no
    training step) or when the head cannot absorb it.
    """
    found = find_whitening(model)
    if found is None:
        return False
    owner, whitening = found
    if whitening.feeds_head and int(whitening.num_batches_tracked) == 0:
        raise ValueError(
            "the whitening fed the head but its running statistics were never estimated "
            "(num_batches_tracked == 0); train at least one step before exporting."
        )
    folded = folded_head(model)
    delattr(owner, WHITENING_MODULE_NAME)
    strip_sd_hooks(model)
    if folded is None:
        return False
    folded.linear.weight.copy_(folded.weight)
    folded.linear.bias.copy_(folded.bias)
    return True
