"""``SaliencyDecorTrainer``: a drop-in ``transformers.Trainer`` that trains with SaliencyDecor.

Swap ``Trainer`` for ``SaliencyDecorTrainer`` and ``TrainingArguments`` for
``SaliencyDecorConfig``; the datasets yield ``pixel_values`` and ``labels`` as for any
image classifier. Each training step runs ``SaliencyDecorLoss`` (clean pass, saliency
mask, masked pass); evaluation is a plain forward under ``no_grad``. The loss components
``loss_ce``, ``loss_kl``, ``loss_decor`` and ``masked_accuracy`` are logged at every
logging step through the configured ``report_to`` loggers.

Example:
    >>> import tempfile, timm, torch
    >>> from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
    >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(32)]
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    >>> args = SaliencyDecorConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=16,
    ...                            group_size=8, report_to="none", use_cpu=True, save_strategy="no",
    ...                            disable_tqdm=True)
    >>> trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=data)
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    2
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from .config import SaliencyDecorConfig
from .features import ModelAdapter, adapt
from .loss import SaliencyDecorLoss, SaliencyDecorOutput

__all__ = ["SaliencyDecorTrainer", "WHITENING_FILE"]

# The whitening buffers, saved beside every checkpoint: PEFT checkpoints hold only the adapter,
# so this file is what carries the running statistics for them (and what export reads).
WHITENING_FILE = "saliency_decor_whitening.safetensors"


def _as_config(args: TrainingArguments | None) -> SaliencyDecorConfig:
    if args is None:
        return SaliencyDecorConfig(output_dir="trainer_output")
    if isinstance(args, SaliencyDecorConfig):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        return SaliencyDecorConfig(**values)
    raise TypeError(f"args must be a SaliencyDecorConfig (or TrainingArguments), got {type(args).__name__}.")


class SaliencyDecorTrainer(Trainer):
    """``transformers.Trainer`` whose training step is ``SaliencyDecorLoss``.

    Takes the same arguments as ``Trainer``; ``args`` is a ``SaliencyDecorConfig`` (a
    plain ``TrainingArguments`` gets the method defaults). ``model`` is a transformers
    image classifier, a timm model, a PEFT-wrapped one, or any classifier with
    ``args.feature_layer`` set.
    """

    # compute_loss returns per-batch means: the step divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self, model: nn.Module | None = None, args: TrainingArguments | None = None, *rest: Any, **kwargs: Any
    ):
        if model is None:
            raise ValueError("SaliencyDecorTrainer needs model= (model_init is not supported).")
        if kwargs.get("model_init") is not None:
            raise ValueError("SaliencyDecorTrainer does not support model_init; pass model= instead.")
        config = _as_config(args)
        self.sd_adapter: ModelAdapter = adapt(model, feature_layer=config.feature_layer)
        self.sd_loss = SaliencyDecorLoss(self.sd_adapter, **config.method_kwargs())
        super().__init__(model, config, *rest, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                "SaliencyDecorTrainer does not support nn.DataParallel (several GPUs in one process); "
                "launch one process per GPU with `accelerate launch` or `torchrun` instead."
            )
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self._sd_metrics: dict[str, list[Tensor]] = defaultdict(list)

    # -- data -------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["pixel_values", "labels", "label", "label_ids", *self.label_names]

    @staticmethod
    def _unpack(inputs: dict[str, Any]) -> tuple[Any, Any]:
        if "pixel_values" not in inputs:
            raise ValueError(
                f"the batch has keys {sorted(inputs)} but no 'pixel_values'; map the dataset so that each "
                "example has 'pixel_values' (a C x H x W tensor) and 'labels'."
            )
        labels = inputs.get("labels", inputs.get("label"))
        return inputs["pixel_values"], labels

    # -- training ---------------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        pixel_values, labels = self._unpack(inputs)
        scale = 1.0 if self.loss_is_scaled_for_ga else 1.0 / self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            output = self.sd_loss.step(
                model, pixel_values, labels, backward=self.accelerator.backward, loss_scale=scale
            )
        self._record(output)
        return output.loss * scale

    def _record(self, output: SaliencyDecorOutput) -> None:
        for name, value in output.components().items():
            if name != "loss":
                self._sd_metrics[name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sd_metrics:
            for name, values in self._sd_metrics.items():
                mean = torch.stack(values).float().mean()
                if self.accelerator.num_processes > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[name] = round(float(mean), 6)
            self._sd_metrics.clear()
        super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        whitening = self.sd_adapter.whitening
        if whitening is not None and self.args.should_save:
            from safetensors.torch import save_file

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            tensors = {name: buffer.detach().cpu().contiguous() for name, buffer in whitening.state_dict().items()}
            save_file(tensors, os.path.join(output_dir, WHITENING_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, WHITENING_FILE)
        whitening = self.sd_adapter.whitening
        if whitening is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            whitening.load_state_dict(load_file(path, device=str(whitening.running_cov.device)))

    # -- evaluation -------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Plain cross-entropy forward (used by evaluation/prediction; no input gradients)."""
        pixel_values, labels = self._unpack(inputs)
        self.sd_adapter.check_batch(pixel_values, labels)
        logits = self.sd_adapter.logits(model, pixel_values)
        loss = F.cross_entropy(logits.float(), labels)
        return (loss, {"logits": logits}) if return_outputs else loss
