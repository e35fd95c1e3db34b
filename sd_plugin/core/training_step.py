"""``SaliencyDecorStep``: the object that runs one SaliencyDecor training step, in every loop.

The step (paper Algorithm 1), for ``method="saliencydecor"``:

1. **clean pass**: ``logits = model(x)`` with ``x.requires_grad``; the feature tap records
   ``f`` and whitens it (``z``); ``L_ce + decor_weight * L_decor`` is back-propagated,
   which yields the weight gradients *and* ``x.grad``;
2. **mask**: the ``mask_ratio`` least salient pixels (by ``|x.grad|``) are replaced;
3. **masked pass**: ``consistency_weight * KL(p_clean || p_masked)`` is back-propagated into
   the same gradients.

Two forward and two backward passes, one graph alive at a time (``consistency_grad=
"detached"``). With ``"both"`` the clean graph is kept, the saliency comes from
``torch.autograd.grad`` and one backward of the whole objective runs at the end (the
official SGT structure: the KL also flows into the clean branch). ``baseline`` is
cross-entropy only, ``sgt`` adds the masking/KL term, ``decor`` adds the
whitening/decorrelation term, ``saliencydecor`` all three.

``step(...)`` runs the backward passes itself (what the Trainer and the recipes call);
``compute_loss(...)`` returns the same objective as one differentiable loss, for loops that
call ``loss.backward()`` themselves (the same gradients, one more backward to the input).

The step makes the host wait for the device nowhere: non-finite loss components are recorded
on the device (``check_finite``) and read by ``raise_if_nonfinite``, which the Trainer and the
recipes call when they log and before they save. ``masked_pass_every`` and ``masked_fraction``
run the masked pass on fewer steps or images (below the two-pass cost).

Example:
    >>> import timm, torch
    >>> from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    >>> step = SaliencyDecorStep(adapt(model), SaliencyDecorArguments(group_size=8))
    >>> x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    >>> sorted(step.step(model, x, y).components())
    ['live_features', 'loss', 'loss_ce', 'loss_decor', 'loss_kl', 'masked_accuracy']
    >>> loss, output = step.compute_loss(model, x, y)
    >>> loss.backward()
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.errors import SaliencyDecorWarning
from ..utils.finite_watch import NonFiniteWatch
from .adapter import ModelAdapter
from .arguments import SETTING_FIELDS, SaliencyDecorArguments
from .bcos import is_bcos, set_b
from .collapse import live_feature_fraction
from .consistency import consistency_loss
from .decorrelation import (
    compiled_decorrelation_loss,
    compiled_whitened_decorrelation_loss,
    decorrelation_loss,
    whitened_decorrelation_loss,
)
from .guidance import (
    energy_loss,
    feature_map_module,
    gradcam_map,
    guidance_masks,
    input_x_gradient_map,
    recording_feature_map,
)
from .input_gradients import (
    adversarial_perturbation,
    explanation_penalty,
    finite_difference_gradient_penalty,
    input_gradient_penalty,
    twice_differentiable_attention,
)
from .masking import mask_least_salient, pixel_saliency
from .running_stats import frozen_running_stats

__all__ = ["SaliencyDecorOutput", "SaliencyDecorStep"]

Backward = Callable[[Tensor], None]
NoSync = Callable[[], contextlib.AbstractContextManager]


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
    loss_input_gradient: Tensor | None = None
    loss_explanation: Tensor | None = None
    loss_energy: Tensor | None = None

    def components(self) -> dict[str, Tensor]:
        """The scalar components present for this method, by log name."""
        values = {
            "loss": self.loss,
            "loss_ce": self.loss_ce,
            "loss_kl": self.loss_kl,
            "loss_decor": self.loss_decor,
            "masked_accuracy": self.masked_accuracy,
            "live_features": self.live_features,
            "loss_input_gradient": self.loss_input_gradient,
            "loss_explanation": self.loss_explanation,
            "loss_energy": self.loss_energy,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass
class _CleanPass:
    """The clean forward: logits, the loss terms (with graphs) and the live-feature fraction."""

    logits: Tensor
    loss_ce: Tensor
    loss_decor: Tensor | None
    objective: Tensor  # loss_ce + decor_weight * loss_decor + the input-gradient terms
    live_features: Tensor | None
    loss_input_gradient: Tensor | None = None
    loss_explanation: Tensor | None = None
    loss_energy: Tensor | None = None


class SaliencyDecorStep:
    """Runs SaliencyDecor training steps for one model (see the module docstring).

    Args:
        adapter: from ``sd_plugin.adapt(model)``.
        args: the method's settings (default: ``SaliencyDecorArguments()``).
        num_processes: processes training together (resolves ``sync_whitening=None``).
        generator: random generator of the ``"random"`` fill (reproducible masks).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        args: SaliencyDecorArguments | None = None,
        *,
        num_processes: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        args = SaliencyDecorArguments() if args is None else SaliencyDecorArguments.from_object(args)
        if args.consistency_grad == "both" and args.uses_masking and num_processes > 1:
            raise ValueError(
                "consistency_grad='both' keeps two graphs alive and is not supported with several processes "
                f"({num_processes}); use consistency_grad='detached'."
            )
        if args.input_gradient_weight > 0 and args.input_gradient_mode == "finite_difference" and num_processes > 1:
            raise ValueError(
                "input_gradient_mode='finite_difference' runs a second forward before the backward, which "
                f"DistributedDataParallel does not support ({num_processes} processes); use 'double_backprop'."
            )
        self.adapter = adapter
        self.args = args
        self.sync_whitening = args.sync_whitening_for(num_processes)
        self.num_processes = num_processes
        if args.whitening_compile and self.sync_whitening:
            args.sync_whitening = True
            args.validate()  # the same error as an explicit sync_whitening=True
        self.generator = generator
        self.uses_masking = args.uses_masking
        self.uses_decorrelation = args.uses_decorrelation
        self._warned: set[str] = set()
        # ``(C, H, W)`` of the first training batch: the size the model is trained at, for the saved metadata
        self.input_size: tuple[int, ...] | None = None
        self._warn_if_head_frozen()
        self._decorrelation_loss = compiled_decorrelation_loss() if args.whitening_compile else decorrelation_loss
        self._whitened_decorrelation_loss = (
            compiled_whitened_decorrelation_loss() if args.whitening_compile else whitened_decorrelation_loss
        )
        self.batches_seen = 0  # training batches this step object ran (numbers the non-finite record)
        self._object_masks: Tensor | None = None  # the batch's, while a step runs (explanation_mask_weight)
        self._current_b: float | None = None
        if args.bcos_b is not None and not is_bcos(adapter.base_model):
            raise ValueError(
                f"bcos_b={args.bcos_b}: the model is not a B-cos network. The Trainer and the recipes convert it; "
                "elsewhere call sd_plugin.core.bcos.bcosify(model) before adapt(model)."
            )
        if args.energy_weight > 0 and args.energy_layer == "features":
            feature_map_module(adapter.base_model)  # no feature map to guide: said now, not at the first step
        self.whitening = None
        if self.uses_decorrelation:
            self.whitening = adapter.attach_whitening(
                group_size=args.group_size,
                whiten_head_input=args.whiten_head_input,
                shrinkage=args.whitening_shrinkage,
                momentum=args.whitening_momentum,
                method=args.whitening_method,
                sync_statistics=self.sync_whitening,
            )
            self.whitening.compiled = args.whitening_compile  # also when the model already carried one
        advice = "Lower the learning rate or check the inputs for NaN"
        if self.whitening is not None:  # only the decorrelation methods whiten
            advice += ", or raise whitening_shrinkage"
        self.finite_watch = NonFiniteWatch(_WATCHED, advice=advice + ".")

    def settings(self) -> dict[str, object]:
        """The method's settings as they act (``whiten_head_input`` resolved), for metadata and cards."""
        settings = {name: getattr(self.args, name) for name in SETTING_FIELDS}
        settings["whiten_head_input"] = bool(self.whitening is not None and self.adapter.tap.whiten_head_input)
        for name in _WHITENING_SETTINGS:
            settings.pop(name)
        if self.whitening is not None:  # the whitening's own values (a model may have carried one already)
            settings.update(
                group_size=self.whitening.group_size,
                whitening_shrinkage=self.whitening.shrinkage,
                whitening_momentum=self.whitening.momentum,
                whitening_method=self.whitening.method,
            )
        return settings

    def metadata(self) -> dict[str, object]:
        """What a saved folder's ``saliency_decor.json`` records, for both front-ends.

        The settings as they act (``settings()``), the model's facts (library, head, feature and
        class counts), the ``(C, H, W)`` trained at and the package version.
        """
        from ..utils.version import __version__

        return {
            **self.settings(),
            "library": self.adapter.library,
            "head_name": self.adapter.head_name,
            "num_features": self.adapter.num_features,
            "num_classes": self.adapter.num_classes,
            "is_transformer": self.adapter.is_transformer,
            "input_size": list(self.input_size) if self.input_size else None,
            "sd_plugin_version": __version__,
        }

    # -- entry points -----------------------------------------------------------------

    def step(
        self,
        model: nn.Module | None,
        pixel_values: Tensor,
        labels: Tensor,
        backward: Backward | None = None,
        loss_scale: float = 1.0,
        no_sync: NoSync | None = None,
        step_index: int | None = None,
        object_masks: Tensor | None = None,
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
            no_sync: context manager factory that suppresses the gradient all-reduce of a
                distributed wrapper: the clean pass (forward and backward) runs inside it, so
                the two-pass step all-reduces the accumulated gradients once, in the masked
                pass's backward. Default: ``model.no_sync`` when ``model`` is a
                ``DistributedDataParallel`` (as Accelerate and the Trainer wrap it), else none.
            step_index: the optimizer step this batch belongs to, for ``masked_pass_every``
                (default: the number of batches this object has run; pass the loop's step
                so that a resumed run keeps the same masked steps).
            object_masks: ``(B, H, W)`` masks, 1 on each image's object: required by
                ``explanation_mask_weight > 0`` (RRR) and ``energy_weight > 0``, ignored otherwise.

        With ``adversarial_epsilon > 0`` every pass runs on the PGD-perturbed batch.

        Non-finite components are recorded, not read: call ``raise_if_nonfinite`` when logging.
        """
        model = self.adapter.model if model is None else model
        backward = backward or (lambda loss: loss.backward())
        decorrelate = self._prepare_batch(pixel_values, labels, object_masks)
        self._apply_bcos_schedule(step_index)
        self._object_masks = object_masks
        pixel_values = self._training_inputs(pixel_values, labels)
        masked_now = self.uses_masking and self._masked_pass_due(step_index)
        with self._whitening_on_running_statistics(self.uses_decorrelation and not decorrelate):
            if not masked_now:
                clean = self._clean_pass(model, pixel_values.detach(), labels, decorrelate)
                backward(clean.objective * loss_scale)
                output = self._output(clean, labels)
            elif self.args.consistency_grad == "both":
                loss, output = self._joint_objective(model, pixel_values, labels, decorrelate, detach_clean=False)
                backward(loss * loss_scale)
            else:
                no_sync = no_sync if no_sync is not None else _ddp_no_sync(model)
                output = self._two_pass_step(model, pixel_values, labels, decorrelate, backward, loss_scale, no_sync)
        self._object_masks = None
        self._record_finite(output)
        return output

    def raise_if_nonfinite(self, step: int | None = None, across_processes: bool = False) -> None:
        """Raise ``NonFiniteLossError`` if a loss component of a batch since the last call was NaN/inf.

        One host read (``NonFiniteWatch``); the Trainer and the recipes call it at each logging
        step, before each checkpoint and at the end of training. ``step``: the current
        optimizer step, for the message's step range; ``across_processes``: a collective that
        raises on every process when any saw a non-finite value. No-op with ``check_finite=False``.
        """
        if self.args.check_finite:
            self.finite_watch.raise_if_nonfinite(step, across_processes=across_processes)

    def compute_loss(
        self, model: nn.Module | None, pixel_values: Tensor, labels: Tensor, object_masks: Tensor | None = None
    ) -> tuple[Tensor, SaliencyDecorOutput]:
        """``(loss, output)``: the step's objective as one differentiable loss; call ``loss.backward()``.

        ``loss.backward()`` gives the gradients ``step`` accumulates (for either
        ``consistency_grad``); the saliency costs one more backward to the input, and the
        clean graph stays alive during the masked pass. A non-finite component raises here,
        before the caller's backward (one host read).
        """
        model = self.adapter.model if model is None else model
        decorrelate = self._prepare_batch(pixel_values, labels, object_masks)
        self._apply_bcos_schedule(None)
        self._object_masks = object_masks
        pixel_values = self._training_inputs(pixel_values, labels)
        masked_now = self.uses_masking and self._masked_pass_due(None)
        with self._whitening_on_running_statistics(self.uses_decorrelation and not decorrelate):
            if not masked_now:
                clean = self._clean_pass(model, pixel_values.detach(), labels, decorrelate)
                loss, output = clean.objective, self._output(clean, labels)
            else:
                detach_clean = self.args.consistency_grad == "detached"
                loss, output = self._joint_objective(model, pixel_values, labels, decorrelate, detach_clean)
        self._object_masks = None
        self._record_finite(output)
        self.raise_if_nonfinite()  # before the caller's backward: such a loop has no logging hook
        return loss, output

    # -- the step's structures ----------------------------------------------------------

    def _two_pass_step(self, model, pixel_values, labels, decorrelate, backward, loss_scale, no_sync):
        """Clean pass and its backward (under ``no_sync``), then the masked pass and its backward."""
        random_masks = self.args.mask_selection == "random"
        # the leaf that collects the input gradient (random masks need none: no gradient to the input)
        inputs = pixel_values.detach() if random_masks else pixel_values.detach().requires_grad_(True)
        with no_sync() if no_sync is not None else contextlib.nullcontext():
            clean = self._clean_pass(model, inputs, labels, decorrelate)
            target = None if random_masks else self._saliency_target(clean, labels)
            if random_masks:
                backward(clean.objective * loss_scale)
                input_grad = None
            elif target is clean.objective:  # its backward runs anyway: the saliency is free
                backward(clean.objective * loss_scale)
                input_grad = inputs.grad
            else:
                (input_grad,) = torch.autograd.grad(target, inputs, retain_graph=True)
                backward(clean.objective * loss_scale)
        masked_logits = self._masked_pass(model, pixel_values.detach(), input_grad)
        loss_kl = self._consistency(clean, masked_logits, detach_clean=True)
        backward(self._consistency_weight() * loss_kl * loss_scale)
        return self._output(clean, labels, loss_kl, masked_logits)

    def _joint_objective(self, model, pixel_values, labels, decorrelate, detach_clean: bool):
        """Clean pass, saliency by ``autograd.grad``, masked pass: the whole objective, graph kept."""
        random_masks = self.args.mask_selection == "random"
        inputs = pixel_values.detach() if random_masks else pixel_values.detach().requires_grad_(True)
        clean = self._clean_pass(model, inputs, labels, decorrelate)
        input_grad = None
        if not random_masks:
            (input_grad,) = torch.autograd.grad(self._saliency_target(clean, labels), inputs, retain_graph=True)
        masked_logits = self._masked_pass(model, pixel_values.detach(), input_grad)
        loss_kl = self._consistency(clean, masked_logits, detach_clean=detach_clean)
        loss = clean.objective + self._consistency_weight() * loss_kl
        return loss, self._output(clean, labels, loss_kl, masked_logits)

    def _masked_pass_due(self, step_index: int | None) -> bool:
        """``masked_pass_every``: whether this step has the masked pass (every k-th optimizer step)."""
        every = self.args.masked_pass_every
        index = self.batches_seen - 1 if step_index is None else step_index  # batches_seen counts this batch
        return every == 1 or index % every == 0

    def _consistency_weight(self) -> float:
        """``consistency_weight``, times ``masked_pass_every``: the same objective on average (lazy regularisation)."""
        return self.args.consistency_weight * self.args.masked_pass_every

    def _masked_count(self, batch: int) -> int:
        """Images of a batch that get the masked pass (``masked_fraction``; at least one)."""
        return max(1, round(self.args.masked_fraction * batch))

    # -- passes ---------------------------------------------------------------------------

    def _clean_pass(self, model: nn.Module, inputs: Tensor, labels: Tensor, decorrelate: bool) -> _CleanPass:
        if self.args.needs_input_gradient_graph and not inputs.requires_grad:
            inputs = inputs.detach().requires_grad_(True)  # the terms differentiate the input gradient
        tap = self.adapter.tap
        tap.clear()
        with twice_differentiable_attention(self.args.needs_double_backward), self._feature_maps() as feature_maps:
            logits = self.adapter.logits(model, inputs)
        features, whitened = tap.features, tap.whitened  # whitened: only when the whitening feeds the head
        tap.clear()
        per_sample_ce = classification_loss(logits, labels, self.args.classification_loss)
        loss_ce = per_sample_ce.mean()
        loss_decor = None
        objective = loss_ce
        if decorrelate:
            loss_decor = self._decorrelation_term(features, whitened)
            objective = loss_ce + self.args.decor_weight * loss_decor
        loss_gradient = loss_explanation = None
        if self.args.input_gradient_weight > 0:
            loss_gradient = self._input_gradient_term(model, inputs, per_sample_ce, labels)
            objective = objective + self.args.input_gradient_weight * loss_gradient
        if self.args.explanation_mask_weight > 0:
            loss_explanation = explanation_penalty(logits, inputs, self._object_masks)
            objective = objective + self.args.explanation_mask_weight * loss_explanation
        loss_energy = None
        if self.args.energy_weight > 0:
            loss_energy = self._energy_term(logits, inputs, labels, feature_maps)
            objective = objective + self.args.energy_weight * loss_energy
        live = live_feature_fraction(features) if features is not None and features.shape[0] > 1 else None
        return _CleanPass(logits, loss_ce, loss_decor, objective, live, loss_gradient, loss_explanation, loss_energy)

    def _feature_maps(self) -> contextlib.AbstractContextManager[list[Tensor]]:
        """Records the last feature map in the forward when the Energy loss reads it (else a no-op)."""
        if self.args.energy_weight > 0 and self.args.energy_layer == "features":
            return recording_feature_map(self.adapter.base_model)
        return contextlib.nullcontext([])

    def _energy_term(self, logits: Tensor, inputs: Tensor, labels: Tensor, feature_maps: list[Tensor]) -> Tensor:
        """The Energy loss of the target's explanation (``energy_layer``) on the batch's ``guidance_masks``."""
        masks = guidance_masks(self._object_masks, self.args.guidance_masks)
        if self.args.energy_layer == "input":
            maps = input_x_gradient_map(logits, inputs, labels)
        else:
            if not feature_maps:
                raise RuntimeError("energy_layer='features': no feature map reached the global pooling in the forward.")
            maps = gradcam_map(logits, feature_maps[-1], labels)
        return energy_loss(maps, masks)

    def _apply_bcos_schedule(self, step_index: int | None) -> None:
        """Set the model's B for this step: ``bcos_b``, reached linearly from 1 over ``bcos_warmup_steps``."""
        if self.args.bcos_b is None:
            return
        index = self.batches_seen - 1 if step_index is None else step_index
        warmup = self.args.bcos_warmup_steps
        b = self.args.bcos_b if warmup == 0 else 1 + (self.args.bcos_b - 1) * min(1.0, (index + 1) / warmup)
        if b != self._current_b:
            set_b(self.adapter.base_model, b)
            self._current_b = b

    def _input_gradient_term(self, model: nn.Module, inputs: Tensor, per_sample_ce: Tensor, labels: Tensor) -> Tensor:
        """``mean ||dCE_i/dx_i||^2`` (``input_gradient_mode``); the finite difference's forward keeps running stats."""
        if self.args.input_gradient_mode == "double_backprop":
            return input_gradient_penalty(per_sample_ce.sum(), inputs)

        def logits_of(images: Tensor) -> Tensor:
            with frozen_running_stats(self.adapter.base_model):
                logits = self.adapter.logits(model, images)
            self.adapter.tap.clear()
            return logits

        return finite_difference_gradient_penalty(
            per_sample_ce, inputs, logits_of, labels, self.args.input_gradient_step
        )

    def _training_inputs(self, pixel_values: Tensor, labels: Tensor) -> Tensor:
        """The batch the passes train on: ``pixel_values``, or its PGD perturbation (``adversarial_epsilon``).

        The attack calls the adapter's model (not a distributed wrapper: no gradient all-reduce) in
        ``eval()`` mode, so BatchNorm and the whitening use their running statistics and update none.
        """
        if not self.args.uses_adversarial_inputs:
            return pixel_values
        model = self.adapter.model
        was_training = model.training
        model.eval()

        def logits_of(images: Tensor) -> Tensor:
            logits = self.adapter.logits(model, images)
            self.adapter.tap.clear()
            return logits

        try:
            delta = adversarial_perturbation(
                logits_of,
                pixel_values,
                labels,
                epsilon=self.args.adversarial_epsilon,
                norm=self.args.adversarial_norm,
                steps=self.args.adversarial_steps,
                step_size=self.args.adversarial_step_size,
                random_start=self.args.adversarial_random_start,
                generator=self.generator,
            )
        finally:
            model.train(was_training)
        return (pixel_values.detach() + delta).to(pixel_values.dtype)

    def _decorrelation_term(self, features: Tensor | None, whitened: Tensor | None) -> Tensor:
        """The decorrelation loss of the clean pass's features (``decor_target``).

        A whitening that feeds the head ran in the forward (``whitened``); one that feeds only
        the loss runs here, with the loss (compiled together with ``whitening_compile``), and
        not at all for ``decor_target="features"``.
        """
        if features is None:
            raise RuntimeError(f"no features were recorded at {self.adapter.head_name!r}.")
        options = {"sync": self.sync_whitening, "liveness_weight": self.args.decor_liveness_weight}
        if self.args.decor_target == "features":
            return self._decorrelation_loss(features, **options)
        if whitened is not None:
            return self._decorrelation_loss(whitened, **options)
        return self._whitened_decorrelation_loss(self.whitening, features, **options)

    def _saliency_target(self, clean: _CleanPass, labels: Tensor) -> Tensor:
        """The scalar whose input gradient ranks the pixels (``saliency_target``)."""
        if self.args.saliency_target == "logit":
            return clean.logits.float().gather(1, labels.view(-1, 1)).sum()
        if self.args.saliency_target == "loss":
            return clean.loss_ce
        return clean.objective

    def _masked_pass(self, model: nn.Module, images: Tensor, input_grad: Tensor | None) -> Tensor:
        """Mask the least salient pixels (or, with ``mask_selection="random"``, random ones) and run the model.

        With ``masked_fraction < 1`` only the batch's first images get the pass (batches are shuffled).
        """
        count = self._masked_count(images.shape[0])
        images = images[:count]
        input_grad = None if input_grad is None else input_grad[:count]
        if self.args.mask_selection == "random":
            # uniform scores: the lowest ``mask_ratio`` of them are a uniformly random pixel set per image
            scores = torch.rand((images.shape[0], *images.shape[2:]), generator=self.generator, device=images.device)
        elif input_grad is None:
            raise RuntimeError(
                "the clean pass produced no input gradient; the model must be differentiable "
                "with respect to pixel_values."
            )
        else:
            scores = pixel_saliency(input_grad)
        masked_images, _ = mask_least_salient(images, scores, self.args.mask_ratio, self.args.mask_fill, self.generator)
        updates_stats = self.args.masked_pass_updates_stats
        with contextlib.nullcontext() if updates_stats else frozen_running_stats(self.adapter.base_model):
            masked_logits = self.adapter.logits(model, masked_images)
            self.adapter.tap.clear()
        return masked_logits

    def _consistency(self, clean: _CleanPass, masked_logits: Tensor, detach_clean: bool) -> Tensor:
        return consistency_loss(clean.logits[: masked_logits.shape[0]], masked_logits, detach_clean=detach_clean)

    def _output(
        self,
        clean: _CleanPass,
        labels: Tensor,
        loss_kl: Tensor | None = None,
        masked_logits: Tensor | None = None,
    ) -> SaliencyDecorOutput:
        total = clean.objective.detach()
        masked_accuracy = None
        if loss_kl is not None and masked_logits is not None:
            total = total + self._consistency_weight() * loss_kl.detach()  # as back-propagated
            masked_accuracy = (masked_logits.detach().argmax(-1) == labels[: masked_logits.shape[0]]).float().mean()
        return SaliencyDecorOutput(
            loss=total,
            loss_ce=clean.loss_ce.detach(),
            loss_kl=None if loss_kl is None else loss_kl.detach(),
            loss_decor=None if clean.loss_decor is None else clean.loss_decor.detach(),
            logits=clean.logits.detach(),
            masked_accuracy=masked_accuracy,
            live_features=clean.live_features,
            loss_input_gradient=None if clean.loss_input_gradient is None else clean.loss_input_gradient.detach(),
            loss_explanation=None if clean.loss_explanation is None else clean.loss_explanation.detach(),
            loss_energy=None if clean.loss_energy is None else clean.loss_energy.detach(),
        )

    # -- checks and warnings --------------------------------------------------------------

    def _prepare_batch(self, pixel_values: Tensor, labels: Tensor, object_masks: Tensor | None = None) -> bool:
        """Check the batch; True when it gets the decorrelation term."""
        self.adapter.check_batch(pixel_values, labels)
        if self.args.needs_masks and object_masks is None:
            args = self.args
            weights = f"explanation_mask_weight={args.explanation_mask_weight}, energy_weight={args.energy_weight}"
            raise ValueError(
                f"{weights}: these terms read each image's object, but the batch has no 'masks': give each example "
                "'masks' (H x W, 1 on the object, all ones when not annotated; sd_plugin.storage.localization_data's "
                "datasets have them), or set both weights to 0."
            )
        self.batches_seen += 1
        if self.input_size is None:
            self.input_size = tuple(int(n) for n in pixel_values.shape[1:])
        return self.uses_decorrelation and self._batch_can_decorrelate(pixel_values.shape[0])

    def _batch_can_decorrelate(self, batch: int) -> bool:
        """False (with one warning) for a batch of one sample; one warning for batches below ``2 x group_size``."""
        if batch < 2 and not self.sync_whitening:
            self._warn_once(
                "single",
                "a training batch of 1 sample (typically the last, incomplete batch): its decorrelation term is "
                "skipped and the whitening uses its running statistics for it. Set dataloader_drop_last=True "
                "(Trainer) to drop such batches.",
                stacklevel=5,
            )
            return False
        group_size = self.whitening.group_size if self.whitening is not None else 0
        # with synchronised whitening the statistics pool every process's batch: count the global batch
        pooled = batch * self.num_processes if self.sync_whitening else batch
        if pooled < 2 * group_size:
            where = f" ({self.num_processes} processes x {batch})" if pooled != batch else ""
            self._warn_once(
                "small",
                f"a training batch of {pooled} samples{where} is smaller than 2 x group_size ({2 * group_size}): each "
                f"group's {group_size}x{group_size} covariance comes from fewer samples than it has entries, so the "
                "whitening and the decorrelation term are noisy. Raise the batch size or lower group_size.",
                stacklevel=5,
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

    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        """Warn once per key, pointing at the caller of the public method (``step``, the constructor)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, SaliencyDecorWarning, stacklevel=stacklevel)

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

    def _record_finite(self, output: SaliencyDecorOutput) -> None:
        """``check_finite``: note non-finite components on the device (read by ``raise_if_nonfinite``)."""
        if self.args.check_finite:
            values = {name: getattr(output, name) for name in _WATCHED}
            self.finite_watch.record(values, batch=self.batches_seen)


def _ddp_no_sync(model: nn.Module) -> NoSync | None:
    """``model.no_sync`` of a ``DistributedDataParallel`` model (the clean pass's backward then does not all-reduce)."""
    return model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) else None


def classification_loss(logits: Tensor, labels: Tensor, kind: str = "cross_entropy") -> Tensor:
    """``(B,)`` per-sample loss: cross-entropy, or one-vs-rest binary cross-entropy with the logit bias
    ``-log(C - 1)`` (the B-cos papers': at zero logits every class has probability 1/C), summed over classes."""
    logits = logits.float()
    if kind == "cross_entropy":
        return F.cross_entropy(logits, labels, reduction="none")
    classes = logits.shape[-1]
    bias = -math.log(classes - 1) if classes > 2 else 0.0
    targets = F.one_hot(labels, classes).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits + bias, targets, reduction="none").sum(-1)


_WATCHED = ("loss_ce", "loss_decor", "loss_kl", "loss_input_gradient", "loss_explanation", "loss_energy")
_WHITENING_SETTINGS = ("group_size", "whitening_shrinkage", "whitening_momentum", "whitening_method")
