"""Fold the running whitening into the classifier head: zero inference overhead.

``head(W (f - mu)) = (A W) f + (b - A W mu)`` with ``W`` the block-diagonal eval-mode
whitening matrix, so the exported model is the plain architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from ..feature_tap import WHITENING_MODULE_NAME, FeatureTap
from ..whitening import GroupZCA, inverse_sqrt_psd, shrink_covariance

__all__ = ["find_whitening", "fold_whitening_into_head", "strip_sd_hooks", "block_diagonal_whitening"]

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
        "for this model, or keep using it through sd_plugin.loading.load_classifier."
    )


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
    delattr(owner, WHITENING_MODULE_NAME)
    strip_sd_hooks(model)
    if not whitening.feeds_head:
        return False
    if int(whitening.num_batches_tracked) == 0:
        raise ValueError(
            "the whitening fed the head but its running statistics were never estimated "
            "(num_batches_tracked == 0); train at least one step before exporting."
        )
    if whitening.tap_where != "input" or not whitening.tap_module_name:
        raise ValueError(
            f"the whitening sits on the output of feature_layer={whitening.tap_module_name!r}; only a whitening "
            "on the head's input can be folded. Export through sd_plugin.loading.load_classifier instead."
        )
    head = owner.get_submodule(whitening.tap_module_name)
    linear = _head_linear(head, whitening.tap_module_name)
    if linear.bias is None:
        raise ValueError(f"head {whitening.tap_module_name!r} has no bias to absorb the whitening's mean.")
    weight_matrix, mean = block_diagonal_whitening(whitening)
    device = linear.weight.device
    folded = linear.weight.double() @ weight_matrix.to(device)  # W is symmetric per block
    bias = linear.bias.double() - folded @ mean.to(device)
    linear.weight.copy_(folded.to(linear.weight.dtype))
    linear.bias.copy_(bias.to(linear.bias.dtype))
    return True
