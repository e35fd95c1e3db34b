"""What the recipes do to a model before training: LoRA adapters, gradient checkpointing."""

from __future__ import annotations

from torch import nn

from ..core.adapter import adapt

__all__ = ["apply_lora", "default_lora_targets", "enable_gradient_checkpointing"]


def default_lora_targets(model: nn.Module, is_transformer: bool) -> list[str]:
    """Attention query/value projections for ViTs; the last two convolutions for CNNs."""
    names = [name for name, _ in model.named_modules()]
    if is_transformer:
        for group in (["q_proj", "v_proj"], ["query", "value"], ["qkv"]):
            if any(name.endswith(group[0]) for name in names):
                return group
        raise ValueError("no attention projections found for LoRA; pass --lora_target_modules.")
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError("no convolutions found for LoRA; pass --lora_target_modules.")
    return convs[-2:]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' ``gradient_checkpointing_enable`` / timm's ``set_grad_checkpointing`` (non-reentrant:
    the input gradient SGT reads flows through the recomputed blocks)."""
    if hasattr(model, "gradient_checkpointing_enable") and getattr(model, "supports_gradient_checkpointing", True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise ValueError(
            f"--gradient_checkpointing: {type(model).__name__} supports neither transformers' "
            "gradient_checkpointing_enable nor timm's set_grad_checkpointing."
        )


def apply_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; its classifier head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    probe = adapt(model)
    probe.remove()
    head = probe.head_name.split(".")[-1]
    targets = targets or default_lora_targets(model, probe.is_transformer)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, modules_to_save=[head])
    return get_peft_model(model, config)
