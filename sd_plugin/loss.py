"""``SaliencyDecorLoss``: one training step of SaliencyDecor, shared by every loop.

The step (DESIGN.md §2), for ``method="saliencydecor"``:

1. clean pass: ``logits = model(x)`` with ``x.requires_grad``; the feature tap records
   ``f`` and whitens it (``z``); ``L_ce + decor_weight * L_decor`` is back-propagated,
   which yields the weight gradients *and* ``x.grad``;
2. the ``mask_ratio`` least salient pixels (by ``|x.grad|``) are replaced;
3. masked pass: ``consistency_weight * KL(p_clean || p_masked)`` is back-propagated into
   the same gradients.

Two forward and two backward passes, one graph alive at a time. With
``consistency_grad="both"`` the clean graph is kept, the saliency comes from
``torch.autograd.grad`` and one backward of the whole objective runs at the end (the
official SGT structure: the KL also flows into the clean branch).

``baseline`` is cross-entropy only, ``sgt`` adds the masking/KL term, ``decor`` adds the
whitening/decorrelation term, ``saliencydecor`` all three.

Example:
    >>> import timm, torch
    >>> from sd_plugin import SaliencyDecorLoss
    >>> from sd_plugin.features import adapt
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    >>> loss = SaliencyDecorLoss(adapt(model), group_size=8)
    >>> out = loss.step(model, torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    >>> sorted(out.components())
    ['live_features', 'loss', 'loss_ce', 'loss_decor', 'loss_kl', 'masked_accuracy']
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .collapse import live_feature_fraction
from .consistency import consistency_loss
from .decorrelation import compiled_decorrelation_loss, decorrelation_loss
from .errors import NonFiniteLossError
from .feature_tap import frozen_running_stats
from .features import ModelAdapter
from .masking import MASK_FILLS, mask_least_salient, pixel_saliency

__all__ = [
    "METHODS",
    "CONSISTENCY_GRADS",
    "DECOR_TARGETS",
    "SALIENCY_TARGETS",
    "SaliencyDecorLoss",
    "SaliencyDecorOutput",
    "NonFiniteLossError",
]

METHODS = ("baseline", "sgt", "decor", "saliencydecor")
CONSISTENCY_GRADS = ("detached", "both")
DECOR_TARGETS = ("whitened", "features")
# What the masking saliency is the input gradient of: the clean objective (cross-entropy plus the
# weighted decorrelation term: free, its backward runs anyway), the cross-entropy alone, or the
# true-class logit. The last two cost one more backward to the input when they differ from the first.
SALIENCY_TARGETS = ("objective", "loss", "logit")


def check_whitening_compile(whitening_compile: bool, method: str, consistency_grad: str) -> None:
    """Refuse ``whitening_compile`` where the step back-propagates a compiled graph twice.

    ``consistency_grad="both"`` keeps the clean graph (``retain_graph``) for a second backward;
    compiled backwards gave wrong gradients there on some machines.
    """
    if whitening_compile and consistency_grad == "both" and method == "saliencydecor":
        raise ValueError(
            "whitening_compile=True does not support consistency_grad='both': that step back-propagates "
            "the clean pass twice (retain_graph), which compiled backwards do not do reliably (wrong "
            "gradients were seen on some machines). Use consistency_grad='detached' (the default) or "
            "whitening_compile=False."
        )


@dataclass
class SaliencyDecorOutput:
    """Detached results of one step. ``loss`` is the full objective (not GA-scaled)."""

    loss: Tensor
    loss_ce: Tensor
    loss_kl: Tensor | None
    loss_decor: Tensor | None
    logits: Tensor
    masked_accuracy: Tensor | None = None
    live_features: Tensor | None = None

    def components(self) -> dict[str, Tensor]:
        """The scalar components present for this method, by log name."""
        values = {
            "loss": self.loss,
            "loss_ce": self.loss_ce,
            "loss_kl": self.loss_kl,
            "loss_decor": self.loss_decor,
            "masked_accuracy": self.masked_accuracy,
            "live_features": self.live_features,
        }
        return {name: value for name, value in values.items() if value is not None}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values are {allowed}.")


class SaliencyDecorLoss:
    """The SaliencyDecor objective for one model (see module docstring).

    Args:
        adapter: from ``sd_plugin.features.adapt(model)``.
        method: ``"baseline"``, ``"sgt"``, ``"decor"`` or ``"saliencydecor"``.
        mask_ratio: fraction ``k`` of least salient pixels replaced, in ``[0, 1)``.
        mask_fill: ``"random"``, ``"mean"``, ``"zero"`` or ``"blur"``.
        decor_weight: ``lambda``, weight of the decorrelation loss (paper 0.01; 0.001 by measurement).
        consistency_weight: ``beta``, weight of the KL consistency loss.
        group_size: ZCA group size ``g`` (must divide the feature width).
        whiten_head_input: whitened features feed the head (default ``False``: only the
            decorrelation loss reads them, see RESULTS.md; ``None``: CNNs yes,
            transformers no, as in the paper).
        decor_target: ``"whitened"`` (default) or ``"features"`` (pre-whitening).
        decor_liveness_weight: cost of a dead feature in the decorrelation loss
            (``decorrelation_loss``'s ``liveness_weight``; 0: the paper's term alone).
        saliency_target: what the masking saliency is the input gradient of: ``"objective"``
            (default: the clean objective, cross-entropy + weighted decorrelation, whose backward
            runs anyway), ``"loss"`` (cross-entropy alone, the paper's ``dL/dx``) or ``"logit"``
            (the true-class logit). The last two add one backward to the input where they differ.
        consistency_grad: ``"detached"`` (default) or ``"both"``.
        masked_pass_updates_stats: the masked pass updates BatchNorm / whitening running
            statistics (the official SGT code does).
        check_finite: raise ``NonFiniteLossError`` naming the component when a loss is
            NaN/inf, before its backward (two host reads per step).
        whitening_shrinkage, whitening_momentum, whitening_method: ``GroupZCA``'s
            ``shrinkage``, ``momentum`` and ``method``.
        whitening_compile: ``torch.compile`` the whitening and the decorrelation loss
            (fused kernels, the same values; the first step compiles). Not with
            ``sync_whitening``, nor with ``consistency_grad="both"``.
        sync_whitening: all-reduce the whitening statistics across processes.
        generator: random generator of the ``"random"`` fill (reproducible masks).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        method: str = "saliencydecor",
        mask_ratio: float = 0.25,
        mask_fill: str = "random",
        decor_weight: float = 0.001,
        consistency_weight: float = 1.0,
        group_size: int = 16,
        whiten_head_input: bool | None = False,
        decor_target: str = "whitened",
        decor_liveness_weight: float = 2.0,
        saliency_target: str = "objective",
        consistency_grad: str = "detached",
        masked_pass_updates_stats: bool = True,
        check_finite: bool = True,
        whitening_shrinkage: float = 0.01,
        whitening_momentum: float = 0.1,
        whitening_method: str = "eigh",
        whitening_compile: bool = False,
        sync_whitening: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_choice("method", method, METHODS)
        _check_choice("mask_fill", mask_fill, MASK_FILLS)
        _check_choice("decor_target", decor_target, DECOR_TARGETS)
        _check_choice("consistency_grad", consistency_grad, CONSISTENCY_GRADS)
        _check_choice("saliency_target", saliency_target, SALIENCY_TARGETS)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if whitening_compile and sync_whitening:
            raise ValueError(
                "whitening_compile=True does not support sync_whitening=True (multi-process statistics) yet; "
                "set whitening_compile=False for distributed runs, or sync_whitening=False."
            )
        check_whitening_compile(whitening_compile, method, consistency_grad)
        weights = (
            ("decor_weight", decor_weight),
            ("consistency_weight", consistency_weight),
            ("decor_liveness_weight", decor_liveness_weight),
        )
        for name, value in weights:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        self.adapter = adapter
        self.method = method
        self.mask_ratio = mask_ratio
        self.mask_fill = mask_fill
        self.decor_weight = decor_weight
        self.consistency_weight = consistency_weight
        self.decor_target = decor_target
        self.decor_liveness_weight = decor_liveness_weight
        self.saliency_target = saliency_target
        self.consistency_grad = consistency_grad
        self.masked_pass_updates_stats = masked_pass_updates_stats
        self.check_finite = check_finite
        self.generator = generator
        self.sync_whitening = sync_whitening
        self.uses_masking = method in ("sgt", "saliencydecor")
        self.uses_decorrelation = method in ("decor", "saliencydecor")
        self._warned: set[str] = set()
        self._warn_if_head_frozen()
        self.whitening = None
        self.whitening_compile = whitening_compile
        self._decorrelation_loss = compiled_decorrelation_loss() if whitening_compile else decorrelation_loss
        if self.uses_decorrelation:
            self.whitening = adapter.attach_whitening(
                group_size=group_size,
                whiten_head_input=whiten_head_input,
                shrinkage=whitening_shrinkage,
                momentum=whitening_momentum,
                method=whitening_method,
                sync_statistics=sync_whitening,
            )
            self.whitening.compiled = whitening_compile  # also when the model already carried one

    def settings(self) -> dict[str, object]:
        """The method's settings as they act (``whiten_head_input`` resolved), for metadata and cards."""
        settings: dict[str, object] = {
            "method": self.method,
            "mask_ratio": self.mask_ratio,
            "mask_fill": self.mask_fill,
            "decor_weight": self.decor_weight,
            "consistency_weight": self.consistency_weight,
            "decor_target": self.decor_target,
            "decor_liveness_weight": self.decor_liveness_weight,
            "saliency_target": self.saliency_target,
            "consistency_grad": self.consistency_grad,
            "masked_pass_updates_stats": self.masked_pass_updates_stats,
            "whiten_head_input": bool(self.whitening is not None and self.adapter.tap.whiten_head_input),
        }
        if self.whitening is not None:
            settings.update(
                group_size=self.whitening.group_size,
                whitening_shrinkage=self.whitening.shrinkage,
                whitening_momentum=self.whitening.momentum,
                whitening_method=self.whitening.method,
            )
        return settings

    def step(
        self,
        model: nn.Module | None,
        pixel_values: Tensor,
        labels: Tensor,
        backward: Callable[[Tensor], None] | None = None,
        loss_scale: float = 1.0,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> SaliencyDecorOutput:
        """Run the passes of one training step and back-propagate them.

        Args:
            model: what to call (the adapter's model, or a DDP/accelerate wrapper of it);
                ``None`` uses ``adapter.model``.
            pixel_values: ``(B, C, H, W)`` float images.
            labels: ``(B,)`` class indices.
            backward: called with each loss to back-propagate (default
                ``loss.backward()``; pass ``accelerator.backward`` in Accelerate loops).
            loss_scale: multiplies every back-propagated loss (e.g. ``1 / grad_accum``).
            no_sync: context manager factory that suppresses DDP's gradient all-reduce
                (e.g. ``functools.partial(accelerator.no_sync, model)``): the clean pass
                (forward and backward) runs inside it, so the two-pass step all-reduces
                the accumulated gradients once, in the masked pass's backward.
        """
        model = self.adapter.model if model is None else model
        backward = backward or (lambda loss: loss.backward())
        self.adapter.check_batch(pixel_values, labels)
        decorrelate = self.uses_decorrelation and self._batch_can_decorrelate(pixel_values.shape[0])
        with self._whitening_on_running_statistics(self.uses_decorrelation and not decorrelate):
            return self._step(model, pixel_values, labels, backward, loss_scale, no_sync, decorrelate)

    def _batch_can_decorrelate(self, batch: int) -> bool:
        """False (with one warning) for a batch of one sample; one warning for batches below ``2 x group_size``."""
        if batch < 2 and not self.sync_whitening:
            self._warn_once(
                "single",
                "a training batch of 1 sample (typically the last, incomplete batch): its decorrelation term is "
                "skipped and the whitening uses its running statistics for it. Set dataloader_drop_last=True "
                "(Trainer) to drop such batches.",
            )
            return False
        group_size = self.whitening.group_size if self.whitening is not None else 0
        if batch < 2 * group_size:
            self._warn_once(
                "small",
                f"a training batch of {batch} samples is smaller than 2 x group_size ({2 * group_size}): each "
                f"group's {group_size}x{group_size} covariance comes from fewer samples than it has entries, so the "
                "whitening and the decorrelation term are noisy. Raise the batch size or lower group_size.",
            )
        return True

    def _warn_if_head_frozen(self) -> None:
        """One warning when every output layer (a Linear with ``num_classes`` outputs) is frozen.

        The usual cause: LoRA on a new classifier without ``modules_to_save=[<head>]``, which leaves
        the randomly initialised head untrained.
        """
        heads = [
            (name, module)
            for name, module in self.adapter.base_model.named_modules()
            if isinstance(module, nn.Linear) and module.out_features == self.adapter.num_classes
        ]
        if heads and not any(p.requires_grad for _, module in heads for p in module.parameters()):
            self._warn_once(
                "frozen_head",
                f"the classification head ({', '.join(name for name, _ in heads)}) has no trainable parameter: "
                "it will keep its initial weights. With PEFT/LoRA add it to modules_to_save (e.g. "
                f"LoraConfig(modules_to_save=[{heads[-1][0].rsplit('.', 1)[-1]!r}])).",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    @contextlib.contextmanager
    def _whitening_on_running_statistics(self, enabled: bool) -> Iterator[None]:
        whitening = self.whitening
        if not enabled or whitening is None or not whitening.training:
            yield
            return
        whitening.eval()
        try:
            yield
        finally:
            whitening.train()

    def _step(self, model, pixel_values, labels, backward, loss_scale, no_sync, decorrelate) -> SaliencyDecorOutput:
        """The passes of ``step`` (``decorrelate``: this batch gets the decorrelation term)."""
        tap = self.adapter.tap
        images = pixel_values.detach()
        detached = self.consistency_grad == "detached"
        # A second detached view (no copy) is the leaf that collects the input gradient.
        inputs = pixel_values.detach().requires_grad_(True) if self.uses_masking else images

        # With DDP the clean pass must not trigger a gradient all-reduce: its forward and
        # backward both run under ``no_sync``; the masked pass's backward syncs once.
        two_backwards = self.uses_masking and detached and no_sync is not None
        with no_sync() if two_backwards else contextlib.nullcontext():
            with tap.whitened_for_loss(decorrelate):
                tap.clear()
                clean_logits = self.adapter.logits(model, inputs)
                features, whitened = tap.features, tap.whitened
                tap.clear()
            loss_ce = F.cross_entropy(clean_logits.float(), labels)
            loss_decor = None
            clean_objective = loss_ce
            if decorrelate:
                target = whitened if self.decor_target == "whitened" else features
                if target is None:
                    raise RuntimeError(f"no features were recorded at {self.adapter.head_name!r}.")
                loss_decor = self._decorrelation_loss(
                    target, sync=self.sync_whitening, liveness_weight=self.decor_liveness_weight
                )
                clean_objective = loss_ce + self.decor_weight * loss_decor
            self._check_finite({"loss_ce": loss_ce, "loss_decor": loss_decor})
            live = live_feature_fraction(features) if features is not None and features.shape[0] > 1 else None

            if not self.uses_masking:
                backward(clean_objective * loss_scale)
                return SaliencyDecorOutput(
                    loss=clean_objective.detach(),
                    loss_ce=loss_ce.detach(),
                    loss_kl=None,
                    loss_decor=None if loss_decor is None else loss_decor.detach(),
                    logits=clean_logits.detach(),
                    live_features=live,
                )
            saliency_of = self._saliency_target(clean_objective, loss_ce, clean_logits, labels)
            if detached and saliency_of is clean_objective:
                backward(clean_objective * loss_scale)
                input_grad = inputs.grad
            else:
                (input_grad,) = torch.autograd.grad(saliency_of, inputs, retain_graph=True)
                if detached:
                    backward(clean_objective * loss_scale)
        if input_grad is None:
            raise RuntimeError(
                "the clean pass produced no input gradient; the model must be differentiable "
                "with respect to pixel_values."
            )
        masked_images, _ = mask_least_salient(
            images, pixel_saliency(input_grad), self.mask_ratio, self.mask_fill, self.generator
        )
        stats_context = (
            contextlib.nullcontext()
            if self.masked_pass_updates_stats
            else frozen_running_stats(self.adapter.base_model)
        )
        with stats_context:
            masked_logits = self.adapter.logits(model, masked_images)
            tap.clear()
        loss_kl = consistency_loss(clean_logits, masked_logits, detach_clean=detached)
        self._check_finite({"loss_kl": loss_kl})
        if detached:
            backward(self.consistency_weight * loss_kl * loss_scale)
        else:
            backward((clean_objective + self.consistency_weight * loss_kl) * loss_scale)
        total = clean_objective.detach() + self.consistency_weight * loss_kl.detach()
        masked_accuracy = (masked_logits.detach().argmax(-1) == labels).float().mean()
        return SaliencyDecorOutput(
            loss=total,
            loss_ce=loss_ce.detach(),
            loss_kl=loss_kl.detach(),
            loss_decor=None if loss_decor is None else loss_decor.detach(),
            logits=clean_logits.detach(),
            masked_accuracy=masked_accuracy,
            live_features=live,
        )

    def _saliency_target(self, objective: Tensor, loss_ce: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        """The scalar whose input gradient ranks the pixels (``saliency_target``)."""
        if self.saliency_target == "logit":
            return logits.float().gather(1, labels.view(-1, 1)).sum()
        if self.saliency_target == "loss" and objective is not loss_ce:
            return loss_ce
        return objective

    def _check_finite(self, components: dict[str, Tensor | None]) -> None:
        if not self.check_finite:
            return
        present = {name: value for name, value in components.items() if value is not None}
        if not present:
            return
        finite = torch.stack([value.detach().float() for value in present.values()]).isfinite()
        if bool(finite.all()):
            return
        bad = [name for name, ok in zip(present, finite.tolist(), strict=True) if not ok]
        values = {name: float(present[name]) for name in bad}
        advice = "Lower the learning rate or check the inputs for NaN"
        if self.whitening is not None:  # only the decorrelation methods whiten
            advice += ", or raise whitening_shrinkage"
        raise NonFiniteLossError(
            f"non-finite loss component(s) {values}: training stopped before this step's update. {advice}."
        )
