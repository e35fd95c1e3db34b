"""``SaliencyDecorArguments``: the method's settings, one dataclass with one ``validate()``.

The single place a method field is declared: ``SaliencyDecorConfig`` (the Trainer's
``TrainingArguments``) inherits it, the recipes parse it with ``HfArgumentParser``, and the
training step (``sd_plugin.core.training_step.SaliencyDecorStep``) is built from it. Adding a field
means adding it here and using it where it acts; checkpoints' metadata, model cards and the
recipes' run identity read the fields from this class.

> Method

- ``method``: ``"saliencydecor"`` (default), ``"baseline"``, ``"sgt"`` or ``"decor"``.

> Saliency masking and consistency

- ``mask_ratio``: fraction of least salient pixels replaced, in ``[0, 1)``; paper 0.25.
- ``mask_fill``: ``"random"`` (default), ``"mean"``, ``"zero"`` or ``"blur"``.
- ``mask_selection``: ``"least_salient"`` (default: the pixels with the smallest input gradient)
  or ``"random"``: pixels drawn uniformly at random per image, the explanation-agnostic control
  (same ratio, fill and consistency; its clean pass takes no input gradient).
- ``consistency_weight``: weight of ``KL(p_clean || p_masked)``; paper 1.0.
- ``consistency_grad``: ``"detached"`` (default, two passes) or ``"both"``.
- ``masked_pass_updates_stats``: the masked pass updates BatchNorm/whitening running stats.
- ``masked_pass_every``: ``k``, run the masked pass (and its KL term, weighted ``k`` times so the
  objective is the same on average: lazy regularisation) on every ``k``-th optimizer step only;
  the other steps cost one pass. Default 1 (every step).
- ``masked_fraction``: fraction of each batch's images that get the masked pass (default 1).

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
- ``whitening_method``: ``"auto"`` (default): the Cholesky whitening when the whitening feeds only
  the loss (the rotation within a group does not change the loss without shrinkage, and barely
  with it; one factorisation, no host sync: RESULTS.md §P), ZCA by ``eigh`` when it feeds the
  head; or ``"eigh"``, ``"newton_schulz"`` (ZCA), ``"cholesky"`` explicitly.
- ``whitening_shrinkage``, ``whitening_momentum``.

> Input-gradient terms (any method; ``sd_plugin.core.input_gradients``)

- ``adversarial_epsilon``: radius of the PGD perturbation the step trains on (0, the default: off);
  ``adversarial_norm`` ``"linf"`` or ``"l2"``; ``adversarial_steps`` ``k`` (1 with
  ``adversarial_random_start``: fast adversarial training); ``adversarial_step_size`` (default
  ``1.25 epsilon`` for one step, ``2.5 epsilon / k`` for more). The attack runs in ``eval()`` mode.
- ``input_gradient_weight``: weight of ``mean_i ||d CE_i / d x_i||^2`` (0: off);
  ``input_gradient_mode`` ``"double_backprop"`` (exact) or ``"finite_difference"`` (along the
  gradient direction, step ``input_gradient_step``; first-order gradients only).
- ``explanation_mask_weight``: weight of RRR's penalty on the input gradient outside each image's
  object mask (0: off); the batches must carry ``masks`` (1 on the object).
- ``energy_weight``: weight of the Energy loss (Rao et al., ICCV 2023): ``1 -`` the positive share of
  the target's explanation inside each image's mask, on ``energy_layer`` ``"input"`` (Input×Gradient)
  or ``"features"`` (Grad-CAM of the last feature map); images whose mask is all ones count as not
  annotated. ``guidance_masks`` ``"shuffled"`` / ``"centred"`` are its controls.

> B-cos (``sd_plugin.core.bcos``)

- ``bcos_b``: B-cosify the model and train it at this B (``None``: off); ``bcos_warmup_steps`` raise
  B linearly from 1; ``classification_loss`` ``"binary_cross_entropy"`` is the papers' loss.

> Execution (``EXECUTION_FIELDS``: how a step runs, not what it computes)

- ``check_finite``: stop with an error naming the loss component that became NaN/inf (recorded on the
  device each step, read at logging steps, before checkpoints and at the end: no host sync in the step).
- ``whitening_compile``: ``torch.compile`` the whitening and the decorrelation loss.
- ``sync_whitening``: all-reduce the whitening statistics across processes (default: when
  several processes train).

> Model

- ``feature_layer``: module whose output is the penultimate features, when the head
  cannot be found automatically.

Example:
    >>> from sd_plugin.core.arguments import SaliencyDecorArguments
    >>> args = SaliencyDecorArguments(method="sgt", mask_ratio=0.5)
    >>> args.method, args.mask_ratio, args.uses_masking, args.uses_decorrelation
    ('sgt', 0.5, True, False)
    >>> SaliencyDecorArguments(mask_ratio=1.0)
    Traceback (most recent call last):
    ...
    ValueError: mask_ratio=1.0 is out of range; use a fraction in [0, 1), e.g. 0.25.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..utils.choices import (
    ADVERSARIAL_NORMS,
    CLASSIFICATION_LOSSES,
    CONSISTENCY_GRADS,
    DECOR_TARGETS,
    ENERGY_LAYERS,
    GUIDANCE_MASKS,
    INPUT_GRADIENT_MODES,
    MASK_FILLS,
    MASK_SELECTIONS,
    METHODS,
    SALIENCY_TARGETS,
    WHITENING_METHOD_SETTINGS,
    check_choice,
    check_fraction,
    check_mask_ratio,
    check_weight,
)

__all__ = ["EXECUTION_FIELDS", "SETTING_FIELDS", "MaskingTestArguments", "SaliencyDecorArguments"]

# Fields that choose how the step runs, not what it computes: a resumed run may change them.
EXECUTION_FIELDS = ("check_finite", "whitening_compile", "sync_whitening")


@dataclass
class SaliencyDecorArguments:
    """The SaliencyDecor method fields (see the module docstring); validated on construction."""

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
    mask_selection: str = field(
        default="least_salient",
        metadata={
            "help": "Which pixels are masked: 'least_salient' (by input gradient) or 'random' (uniform per image: "
            "the control that tells saliency guidance from robustness to masking).",
            "choices": list(MASK_SELECTIONS),
        },
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
    masked_pass_every: int = field(
        default=1,
        metadata={
            "help": "Run the masked pass on every k-th optimizer step only (its KL weighted k times: the same "
            "objective on average); the steps between cost one pass. 1: every step."
        },
    )
    masked_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of each batch's images that get the masked pass, in (0, 1]."},
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
        default="auto",
        metadata={
            "help": "How each group is whitened: 'auto' (Cholesky when the whitening feeds only the loss, ZCA by "
            "eigh when it feeds the head), 'eigh', 'newton_schulz' (ZCA) or 'cholesky' (loss only).",
            "choices": list(WHITENING_METHOD_SETTINGS),
        },
    )
    adversarial_epsilon: float = field(
        default=0.0,
        metadata={
            "help": "Radius of the PGD perturbation each training batch is replaced by (in the model's input "
            "units, after normalisation), >= 0; 0 switches adversarial training off."
        },
    )
    adversarial_norm: str = field(
        default="linf",
        metadata={"help": f"Ball of the perturbation, one of {ADVERSARIAL_NORMS}.", "choices": list(ADVERSARIAL_NORMS)},
    )
    adversarial_steps: int = field(
        default=1, metadata={"help": "PGD steps k, >= 1 (1 with a random start: fast adversarial training)."}
    )
    adversarial_step_size: Optional[float] = field(  # noqa: UP045
        default=None,
        metadata={"help": "PGD step size; default 1.25 * epsilon for one step, 2.5 * epsilon / k for more."},
    )
    adversarial_random_start: bool = field(
        default=True, metadata={"help": "Start PGD at a random point of the ball (else at the image)."}
    )
    input_gradient_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the input-gradient norm penalty mean ||dCE/dx||^2, >= 0; 0 switches it off."},
    )
    input_gradient_mode: str = field(
        default="double_backprop",
        metadata={
            "help": "How the penalty is computed: 'double_backprop' (exact) or 'finite_difference' (along the "
            "gradient direction; first-order gradients only).",
            "choices": list(INPUT_GRADIENT_MODES),
        },
    )
    input_gradient_step: float = field(
        default=0.01, metadata={"help": "Finite-difference step h of input_gradient_mode='finite_difference', > 0."}
    )
    explanation_mask_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the 'right for the right reasons' penalty on input gradients outside each image's "
            "object mask (batches carry 'masks', 1 on the object), >= 0; 0 switches it off."
        },
    )
    energy_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the Energy loss (1 - the explanation's positive share inside each image's object mask; "
            "batches carry 'masks', all-ones = not annotated), >= 0; 0 switches it off."
        },
    )
    energy_layer: str = field(
        default="input",
        metadata={
            "help": "Where the Energy loss reads the explanation: 'input' (Input x Gradient) or 'features' "
            "(Grad-CAM of the last feature map).",
            "choices": list(ENERGY_LAYERS),
        },
    )
    guidance_masks: str = field(
        default="given",
        metadata={
            "help": "The masks the Energy loss uses: 'given', or the controls 'shuffled' (across the batch's "
            "images) and 'centred' (a centred disc of the batch's mean mask area).",
            "choices": list(GUIDANCE_MASKS),
        },
    )
    bcos_b: Optional[float] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "B-cosify the model (sd_plugin.core.bcos.bcosify) and train it at this B (>= 1; the papers use "
            "2); None: a plain model."
        },
    )
    bcos_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which B rises linearly from 1 to bcos_b (0: at once)."}
    )
    classification_loss: str = field(
        default="cross_entropy",
        metadata={
            "help": "'cross_entropy', or 'binary_cross_entropy' (one-vs-rest with the logit bias -log(C - 1), "
            "the B-cos papers' loss).",
            "choices": list(CLASSIFICATION_LOSSES),
        },
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
    check_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop with an error naming the component when a loss becomes NaN/inf (checked at logging steps and "
            "before checkpoints; no host sync in the step)."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a value the method cannot use."""
        check_choice("method", self.method, METHODS)
        check_choice("mask_fill", self.mask_fill, MASK_FILLS)
        check_choice("mask_selection", self.mask_selection, MASK_SELECTIONS)
        check_choice("consistency_grad", self.consistency_grad, CONSISTENCY_GRADS)
        check_choice("decor_target", self.decor_target, DECOR_TARGETS)
        check_choice("saliency_target", self.saliency_target, SALIENCY_TARGETS)
        check_choice("whitening_method", self.whitening_method, WHITENING_METHOD_SETTINGS)
        check_mask_ratio(self.mask_ratio)
        if self.mask_ratio == 0 and self.method in ("sgt", "saliencydecor"):
            raise ValueError(
                f"mask_ratio=0 masks no pixel: with method={self.method!r} the masked pass would repeat the clean "
                "pass and the KL term would be 0. Use a ratio in (0, 1), e.g. 0.25, or method='baseline' / 'decor' "
                "to train without masking."
            )
        if not isinstance(self.masked_pass_every, int) or self.masked_pass_every < 1:
            raise ValueError(
                f"masked_pass_every={self.masked_pass_every!r} must be a whole number >= 1 (1: the masked pass on "
                "every step, 4: on every 4th step)."
            )
        check_fraction("masked_fraction", self.masked_fraction, low_open=True)
        self._validate_input_gradient_terms()
        for name in ("decor_weight", "consistency_weight", "decor_liveness_weight"):
            check_weight(name, getattr(self, name))
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be a positive divisor of the feature width.")
        check_fraction("whitening_shrinkage", self.whitening_shrinkage)
        check_fraction("whitening_momentum", self.whitening_momentum, low_open=True)
        if self.whitening_compile and self.sync_whitening:
            raise ValueError(
                "whitening_compile=True does not support sync_whitening=True (multi-process statistics) yet; "
                "set whitening_compile=False for distributed runs, or sync_whitening=False."
            )
        if self.whitening_compile and self.consistency_grad == "both" and self.method == "saliencydecor":
            # That step back-propagates the clean pass twice (retain_graph).
            raise ValueError(
                "whitening_compile=True does not support consistency_grad='both': that step back-propagates "
                "the clean pass twice (retain_graph), which compiled backwards do not do reliably (wrong "
                "gradients were seen on some machines). Use consistency_grad='detached' (the default) or "
                "whitening_compile=False."
            )

    def _validate_input_gradient_terms(self) -> None:
        check_choice("adversarial_norm", self.adversarial_norm, ADVERSARIAL_NORMS)
        check_choice("input_gradient_mode", self.input_gradient_mode, INPUT_GRADIENT_MODES)
        for name in ("adversarial_epsilon", "input_gradient_weight", "explanation_mask_weight", "energy_weight"):
            check_weight(name, getattr(self, name))
        check_choice("energy_layer", self.energy_layer, ENERGY_LAYERS)
        check_choice("guidance_masks", self.guidance_masks, GUIDANCE_MASKS)
        check_choice("classification_loss", self.classification_loss, CLASSIFICATION_LOSSES)
        if self.bcos_b is not None and not self.bcos_b >= 1:
            raise ValueError(f"bcos_b={self.bcos_b} must be >= 1 (1: the original linear maps; the papers use 2).")
        if not isinstance(self.bcos_warmup_steps, int) or self.bcos_warmup_steps < 0:
            raise ValueError(f"bcos_warmup_steps={self.bcos_warmup_steps!r} must be a whole number >= 0.")
        if self.bcos_b is not None and self.method in ("decor", "saliencydecor"):
            raise ValueError(
                f"bcos_b={self.bcos_b} with method={self.method!r}: a B-cos head reads the feature map, which the "
                "decorrelation term does not take. Use method='baseline' or 'sgt' with bcos_b."
            )
        if not isinstance(self.adversarial_steps, int) or self.adversarial_steps < 1:
            raise ValueError(f"adversarial_steps={self.adversarial_steps!r} must be a whole number >= 1 (PGD steps).")
        if self.adversarial_step_size is not None and not self.adversarial_step_size > 0:
            raise ValueError(
                f"adversarial_step_size={self.adversarial_step_size} must be > 0, or None for the default "
                "(1.25 * epsilon for one step, 2.5 * epsilon / steps for more)."
            )
        if not self.input_gradient_step > 0:
            raise ValueError(f"input_gradient_step={self.input_gradient_step} must be > 0, e.g. 0.01.")
        second_order = (
            self.explanation_mask_weight > 0
            or self.energy_weight > 0
            or (self.input_gradient_weight > 0 and self.input_gradient_mode == "double_backprop")
        )
        if self.whitening_compile and second_order:
            raise ValueError(
                "whitening_compile=True does not support double back-propagation (explanation_mask_weight or "
                "energy_weight > 0, or "
                "input_gradient_weight > 0 with input_gradient_mode='double_backprop'): compiled graphs are not "
                "differentiated twice. Set whitening_compile=False, or input_gradient_mode='finite_difference'."
            )

    @property
    def uses_adversarial_inputs(self) -> bool:
        """The step trains on PGD-perturbed inputs (``adversarial_epsilon > 0``)."""
        return self.adversarial_epsilon > 0

    @property
    def needs_input_gradient_graph(self) -> bool:
        """The clean pass adds a term of the input gradient (gradient norm or RRR): its input needs a gradient."""
        return (
            self.input_gradient_weight > 0
            or self.explanation_mask_weight > 0
            or (self.energy_weight > 0 and self.energy_layer == "input")
        )

    @property
    def needs_double_backward(self) -> bool:
        """The objective back-propagates through an input gradient (double-backprop penalty or RRR)."""
        return (
            self.explanation_mask_weight > 0
            or self.energy_weight > 0
            or (self.input_gradient_weight > 0 and self.input_gradient_mode == "double_backprop")
        )

    @property
    def needs_masks(self) -> bool:
        """Batches must carry object ``masks`` (RRR or the Energy loss)."""
        return self.explanation_mask_weight > 0 or self.energy_weight > 0

    @property
    def uses_masking(self) -> bool:
        """The method has the masked pass and the KL consistency term (``sgt``, ``saliencydecor``)."""
        return self.method in ("sgt", "saliencydecor")

    @property
    def uses_decorrelation(self) -> bool:
        """The method whitens and has the decorrelation term (``decor``, ``saliencydecor``)."""
        return self.method in ("decor", "saliencydecor")

    def sync_whitening_for(self, num_processes: int) -> bool:
        """``sync_whitening`` resolved: ``None`` means on when training runs in several processes."""
        return bool(num_processes > 1 if self.sync_whitening is None else self.sync_whitening)

    def check_batch_size(self, batch_size: int, num_processes: int = 1) -> None:
        """Refuse a per-device batch of one sample, on which the decorrelation term never acts.

        (Across several processes with ``sync_whitening`` the statistics are pooled, so it does.)
        """
        if self.uses_decorrelation and batch_size < 2 and not self.sync_whitening_for(num_processes):
            raise ValueError(
                f"per_device_train_batch_size={batch_size}: with method={self.method!r} the decorrelation term needs "
                "at least 2 samples per batch, so it would never be applied. Raise the batch size (gradient "
                "accumulation does not help: each forward is one batch), or use method='sgt'."
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The method fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(SaliencyDecorArguments))

    @classmethod
    def from_object(cls, source: Any) -> SaliencyDecorArguments:
        """The method fields of any object carrying them (a ``SaliencyDecorConfig``, a namespace...)."""
        return cls(**{name: getattr(source, name) for name in cls.field_names() if hasattr(source, name)})

    def to_dict(self) -> dict[str, Any]:
        """The method fields and their values (JSON-serialisable)."""
        return {name: getattr(self, name) for name in self.field_names()}


# The fields that describe the method a model was trained with (metadata, model cards): all but
# the execution fields and where the features are read.
SETTING_FIELDS = tuple(
    name for name in SaliencyDecorArguments.field_names() if name not in (*EXECUTION_FIELDS, "feature_layer")
)


@dataclass
class MaskingTestArguments:
    """The masking test run at each evaluation during training (Trainer and recipes alike)."""

    eval_masking_samples: int = field(
        default=256,
        metadata={
            "help": "Images (a fixed random subset of the evaluation set: the same for every model) for the "
            "masking test; 0 skips it in the recipes."
        },
    )
    eval_masking_step: float = field(
        default=5.0,
        metadata={"help": "Masking-test step in percent of pixels (0, 100]; 5 as `python -m sd_plugin evaluate`."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.eval_masking_samples < 0:
            raise ValueError(f"eval_masking_samples={self.eval_masking_samples} must be >= 0 (0: no masking test).")
        if not 0.0 < self.eval_masking_step <= 100.0:
            raise ValueError(f"eval_masking_step={self.eval_masking_step} must be in (0, 100].")
