"""``SaliencyDecorConfig``: ``transformers.TrainingArguments`` plus the method's fields.

Every ``TrainingArguments`` option keeps working (bf16, gradient accumulation,
``report_to``, ``push_to_hub``, ...). The method fields, grouped:

> Method

- ``method``: ``"saliencydecor"`` (default), ``"baseline"``, ``"sgt"`` or ``"decor"``.

> Saliency masking and consistency

- ``mask_ratio``: fraction of least salient pixels replaced, in ``[0, 1)``; paper 0.25.
- ``mask_fill``: ``"random"`` (default), ``"mean"``, ``"zero"`` or ``"blur"``.
- ``consistency_weight``: weight of ``KL(p_clean || p_masked)``; paper 1.0.
- ``consistency_grad``: ``"detached"`` (default, two passes) or ``"both"``.
- ``masked_pass_updates_stats``: the masked pass updates BatchNorm/whitening running stats.

> Whitening and decorrelation

- ``decor_weight``: weight of the decorrelation loss; default 0.001 (the paper's best ablation
  value; with the collapse-proof loss it was ahead of the paper's default 0.01 in mean accuracy
  and gap, not significantly, RESULTS.md §0).
- ``group_size``: ZCA group size (divides the feature width; <= 32).
- ``whiten_head_input``: whitened features feed the head. Default ``False``: the whitening
  only feeds the decorrelation loss (the paper's ViT variant) for every model, chosen by
  measurement (RESULTS.md: on Fashion-MNIST the whitened head gained accuracy but lowered the
  faithfulness gap below the baseline's). ``True`` is the paper's CNN Algorithm 1; ``None``
  picks the paper's rule (CNNs yes, ViTs no).
- ``decor_target``: ``"whitened"`` (default) or ``"features"``.
- ``decor_liveness_weight``: what a dead feature costs in the decorrelation loss (default 2:
  killing a unit never lowers it; 0: the paper's off-diagonal term alone, which rewards
  dead units).
- ``saliency_target``: what the masking saliency is the input gradient of: ``"objective"``
  (default, free), ``"loss"`` (cross-entropy alone) or ``"logit"`` (true-class logit).
- ``whitening_shrinkage``, ``whitening_momentum``, ``whitening_method``, ``whitening_compile``,
  ``sync_whitening``.

> Evaluation

- ``eval_masking_auc``, ``eval_masking_samples``, ``eval_masking_step``: report the masking
  test (``eval_masking_auc``, ``eval_masking_auc_random``, ``eval_faithfulness_gap``) and
  ``eval_accuracy`` at each evaluation.

> Model

- ``feature_layer``: module whose output is the penultimate features, when the head
  cannot be found automatically.

Example:
    >>> from sd_plugin import SaliencyDecorConfig
    >>> args = SaliencyDecorConfig(output_dir="out", method="sgt", mask_ratio=0.5)
    >>> args.method, args.mask_ratio, args.remove_unused_columns
    ('sgt', 0.5, True)
    >>> SaliencyDecorConfig(output_dir="out", mask_fill="noise")
    Traceback (most recent call last):
    ...
    ValueError: mask_fill='noise' is not supported; allowed values are ('random', 'mean', 'zero', 'blur').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .loss import CONSISTENCY_GRADS, DECOR_TARGETS, METHODS, SALIENCY_TARGETS, check_whitening_compile
from .masking import MASK_FILLS

__all__ = ["SaliencyDecorConfig", "METHOD_FIELDS", "loss_kwargs", "method_arguments_class"]


@dataclass
class SaliencyDecorConfig(TrainingArguments):
    """``TrainingArguments`` with the SaliencyDecor method fields (see module docstring)."""

    method: str = field(
        default="saliencydecor",
        metadata={"help": f"Training objective, one of {METHODS}.", "choices": list(METHODS)},
    )
    mask_ratio: float = field(
        default=0.25,
        metadata={"help": "Fraction of least salient pixels replaced in the masked pass, in [0, 1)."},
    )
    mask_fill: str = field(
        default="random",
        metadata={"help": f"Replacement of masked pixels, one of {MASK_FILLS}.", "choices": list(MASK_FILLS)},
    )
    consistency_weight: float = field(default=1.0, metadata={"help": "Weight beta of KL(p_clean || p_masked), >= 0."})
    consistency_grad: str = field(
        default="detached",
        metadata={
            "help": "'detached': the KL trains the masked branch only (two passes, one graph alive); "
            "'both': it also flows into the clean branch (official SGT; slower, more memory).",
            "choices": list(CONSISTENCY_GRADS),
        },
    )
    masked_pass_updates_stats: bool = field(
        default=True,
        metadata={"help": "Whether the masked pass updates BatchNorm and whitening running statistics."},
    )
    decor_weight: float = field(
        default=0.001,
        metadata={"help": "Weight lambda of the decorrelation loss, >= 0 (paper 0.01; 0.001 chosen by measurement)."},
    )
    group_size: int = field(
        default=16, metadata={"help": "Group size of the ZCA whitening; must divide the feature width."}
    )
    whiten_head_input: Optional[bool] = field(  # noqa: UP045 - HfArgumentParser needs Optional
        default=False,
        metadata={
            "help": "Feed whitened features to the head (paper's CNN Algorithm 1). Default False: whitening "
            "feeds only the decorrelation loss (measured: more faithful saliency); None: CNNs yes, ViTs no."
        },
    )
    decor_target: str = field(
        default="whitened",
        metadata={
            "help": "Features the decorrelation loss reads: 'whitened' or 'features' (pre-whitening).",
            "choices": list(DECOR_TARGETS),
        },
    )
    decor_liveness_weight: float = field(
        default=2.0,
        metadata={
            "help": "Cost of a dead (constant) feature in the decorrelation loss, >= 0. Default 2: killing a unit "
            "never lowers the loss; 0: the paper's off-diagonal term alone (it rewards dead units)."
        },
    )
    saliency_target: str = field(
        default="objective",
        metadata={
            "help": "What the masking saliency is the input gradient of: 'objective' (cross-entropy + weighted "
            "decorrelation, free), 'loss' (cross-entropy alone) or 'logit' (true-class logit); the last two "
            "cost one more backward to the input.",
            "choices": list(SALIENCY_TARGETS),
        },
    )
    whitening_shrinkage: float = field(
        default=0.01, metadata={"help": "Scale-relative covariance shrinkage of the whitening, in [0, 1]."}
    )
    whitening_momentum: float = field(
        default=0.1, metadata={"help": "Momentum of the whitening running statistics, in (0, 1]."}
    )
    whitening_method: str = field(
        default="eigh",
        metadata={"help": "Inverse square root: 'eigh' or 'newton_schulz'.", "choices": ["eigh", "newton_schulz"]},
    )
    whitening_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the whitening and decorrelation loss into fused kernels (same values; the "
            "first step compiles). Not with sync_whitening, nor with consistency_grad='both'."
        },
    )
    sync_whitening: Optional[bool] = field(  # noqa: UP045
        default=None,
        metadata={"help": "All-reduce whitening statistics across processes (default: on when distributed)."},
    )
    feature_layer: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata={"help": "Module whose output is the penultimate features, if the head is not found."},
    )
    eval_masking_auc: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation also report eval_masking_auc, eval_masking_auc_random and "
            "eval_faithfulness_gap (the paper's masking test) on eval_masking_samples images drawn at random "
            "(a fixed seed: the same images for every model) from the whole evaluation set."
        },
    )
    eval_masking_samples: int = field(
        default=256, metadata={"help": "Images (a fixed random subset of the evaluation set) for the masking test."}
    )
    eval_masking_step: float = field(
        default=5.0, metadata={"help": "Masking-test step in percent of pixels (0, 100]; 5 as in DESIGN.md §4."}
    )
    check_finite: bool = field(
        default=True,
        metadata={"help": "Stop with an error naming the component when a loss becomes NaN/inf."},
    )

    def __post_init__(self) -> None:
        _validate_method_fields(self)
        super().__post_init__()

    def method_kwargs(self) -> dict:
        """Keyword arguments of ``SaliencyDecorLoss`` taken from this config."""
        return loss_kwargs(self, self.world_size)


METHOD_FIELDS = tuple(
    name for name in SaliencyDecorConfig.__dataclass_fields__ if name not in TrainingArguments.__dataclass_fields__
)


def loss_kwargs(method_args: object, world_size: int = 1) -> dict:
    """``SaliencyDecorLoss`` keyword arguments from a config or ``method_arguments_class()`` instance."""
    sync = getattr(method_args, "sync_whitening", None)
    if sync is None:
        sync = world_size > 1
    names = (
        "method",
        "mask_ratio",
        "mask_fill",
        "decor_weight",
        "consistency_weight",
        "group_size",
        "whiten_head_input",
        "decor_target",
        "decor_liveness_weight",
        "saliency_target",
        "consistency_grad",
        "masked_pass_updates_stats",
        "check_finite",
        "whitening_shrinkage",
        "whitening_momentum",
        "whitening_method",
        "whitening_compile",
    )
    return {**{name: getattr(method_args, name) for name in names}, "sync_whitening": bool(sync)}


def method_arguments_class() -> type:
    """A plain dataclass with exactly the method fields of ``SaliencyDecorConfig``.

    Recipes parse it with ``HfArgumentParser`` beside their own arguments, so every method
    field is a flag with the same name, default and help as in the Trainer config.
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(SaliencyDecorConfig)
    specs = []
    for f in dataclasses.fields(SaliencyDecorConfig):
        if f.name in METHOD_FIELDS and not f.name.startswith("eval_"):  # the loops have their own eval flags
            specs.append((f.name, hints[f.name], field(default=f.default, metadata=dict(f.metadata))))
    namespace = {
        "__doc__": "SaliencyDecor method fields (see SaliencyDecorConfig).",
        "validate": _validate_method_fields,
    }
    return dataclasses.make_dataclass("SaliencyDecorArguments", specs, namespace=namespace)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values are {allowed}.")


def _validate_method_fields(config: SaliencyDecorConfig) -> None:
    _choice("method", config.method, METHODS)
    _choice("mask_fill", config.mask_fill, MASK_FILLS)
    _choice("consistency_grad", config.consistency_grad, CONSISTENCY_GRADS)
    _choice("decor_target", config.decor_target, DECOR_TARGETS)
    _choice("saliency_target", config.saliency_target, SALIENCY_TARGETS)
    _choice("whitening_method", config.whitening_method, ("eigh", "newton_schulz"))
    if not 0.0 <= config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={config.mask_ratio} is out of range; use a fraction in [0, 1), e.g. 0.25.")
    for name in ("decor_weight", "consistency_weight", "decor_liveness_weight"):
        value = getattr(config, name)
        if value < 0:
            raise ValueError(f"{name}={value} is negative; use a weight >= 0 (0 switches the term off).")
    if config.group_size < 1:
        raise ValueError(f"group_size={config.group_size} must be a positive divisor of the feature width.")
    if not 0.0 <= config.whitening_shrinkage <= 1.0:
        raise ValueError(f"whitening_shrinkage={config.whitening_shrinkage} must be in [0, 1].")
    if getattr(config, "eval_masking_samples", 1) < 1:
        raise ValueError(f"eval_masking_samples={config.eval_masking_samples} must be >= 1.")
    if not 0.0 < getattr(config, "eval_masking_step", 5.0) <= 100.0:
        raise ValueError(f"eval_masking_step={config.eval_masking_step} must be in (0, 100].")
    if not 0.0 < config.whitening_momentum <= 1.0:
        raise ValueError(f"whitening_momentum={config.whitening_momentum} must be in (0, 1].")
    check_whitening_compile(config.whitening_compile, config.method, config.consistency_grad)
