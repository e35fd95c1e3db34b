"""``SaliencyDecorTrainer``: a drop-in ``transformers.Trainer`` that trains with SaliencyDecor.

Swap ``Trainer`` for ``SaliencyDecorTrainer`` and ``TrainingArguments`` for
``SaliencyDecorConfig``; the datasets yield ``pixel_values`` and ``labels`` as for any
image classifier. Each training step runs ``SaliencyDecorStep`` (clean pass, saliency
mask, masked pass; under several processes the clean pass runs under ``no_sync``, so each
step all-reduces the gradients once); evaluation is a plain forward under ``no_grad``. A
non-finite loss component stops training at the next logging step or save (whichever comes
first) with an error naming it; no checkpoint is written from a non-finite state. The loss components
``loss_ce``, ``loss_kl``, ``loss_decor``, ``masked_accuracy`` and ``live_features`` (the fraction
of penultimate features alive in the batch, ``sd_plugin.core.collapse``) are logged at every
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

import functools
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from ..core.adapter import ModelAdapter, adapt
from ..core.bcos import bcosify_for_training, is_bcos, save_bcos_files
from ..core.training_log import TrainingLog
from ..core.training_step import SaliencyDecorStep
from ..evaluation.masking_curve import masking_metrics_during_training
from ..storage import checkpoint
from ..storage.data_checks import check_training_data
from ..storage.peft_folders import save_adapter_base
from ..storage.preprocessing_record import TrainingPreprocessing, apply_to_timm_model, write_processor_normalization
from ..utils.batches import unpack_batch
from ..utils.errors import SaliencyDecorWarning
from ..utils.launch_check import check_cpu_launch
from ..utils.meter import MetricMeter
from ..utils.previous_run import guard_previous_run
from .config import METHOD_FIELDS, SaliencyDecorConfig

__all__ = ["SaliencyDecorTrainer", "TRAINER_RUN_FILES"]

logger = logging.getLogger(__name__)

# What a Trainer run leaves in output_dir: a new run into a folder holding any of these is refused
# unless it resumes or sets overwrite_output_dir (which deletes them first).
TRAINER_RUN_FILES = (
    "checkpoint-*",
    "trainer_state.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    checkpoint.METADATA_FILE,
    checkpoint.WHITENING_FILE,
    *checkpoint.WEIGHT_FILES,
)


def _as_config(args: TrainingArguments | None) -> SaliencyDecorConfig:
    if args is None:
        return SaliencyDecorConfig(output_dir="trainer_output")
    if isinstance(args, SaliencyDecorConfig):
        return args
    if isinstance(args, TrainingArguments):  # as TRL's trainers convert a plain TrainingArguments
        return SaliencyDecorConfig.from_training_arguments(args)
    raise TypeError(f"args must be a SaliencyDecorConfig (or TrainingArguments), got {type(args).__name__}.")


class SaliencyDecorTrainer(Trainer):
    """``transformers.Trainer`` whose training step is ``SaliencyDecorStep``.

    Takes ``Trainer``'s arguments; ``args`` is a ``SaliencyDecorConfig`` (a plain
    ``TrainingArguments`` gets the method defaults). ``model`` is a transformers image
    classifier, a timm model, a PEFT-wrapped one, or any classifier with
    ``args.feature_layer`` set. ``model_init`` and ``compute_loss_func`` are not supported:
    the model must exist to attach the feature tap, and the loss is the method's.
    """

    # compute_loss returns per-batch means: the step divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
    ):
        check_cpu_launch()  # `accelerate launch --cpu --num_processes N` without MPI starts one process
        if model is None:
            raise ValueError("SaliencyDecorTrainer needs model= (model_init is not supported).")
        args = _as_config(args)
        # the normalisation training used, recorded in every saved folder (None: unknown, warned of at train())
        self.training_preprocessing = TrainingPreprocessing.resolve(
            args.image_mean, args.image_std, args.image_crop_pct, processing_class
        )
        if args.bcos_b is not None:  # B-cosify in place, reading [x, 1 - x] in the training normalisation's pixels
            known = self.training_preprocessing
            bcosify_for_training(
                model, args.bcos_b, args.bcos_warmup_steps, known.mean if known else None, known.std if known else None
            )
        self.sd_adapter: ModelAdapter = adapt(
            model, feature_layer=args.feature_layer, example_inputs=_example_inputs(train_dataset)
        )
        self.sd_step = SaliencyDecorStep(self.sd_adapter, args.method_arguments(), num_processes=args.world_size)
        if self.training_preprocessing is not None and self.sd_adapter.family.name == "timm":
            apply_to_timm_model(getattr(self.sd_adapter.base_model, "timm_model", self.sd_adapter.base_model),
                                self.training_preprocessing)  # fmt: skip
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                "SaliencyDecorTrainer does not support nn.DataParallel (several GPUs in one process); "
                "launch one process per GPU with `accelerate launch` or `torchrun` instead."
            )
        if self.args.label_names is None:
            self.label_names = ["labels"]
        # The step's components while training (with the non-finite and collapse checks), accuracy in evaluation.
        self._training_log = TrainingLog(self.sd_step)
        self._eval_metrics = MetricMeter()
        self._warned_unfolded = False
        self._unloaded_keys: list[str] = []  # set by _issue_warnings_after_load while a checkpoint loads
        if self.args.push_to_hub:
            warnings.warn(
                f"push_to_hub=True: checkpoints stay local (hub_strategy={self.args.hub_strategy!r} is not applied); "
                "call trainer.push_to_hub() after training to publish the exported model (whitening folded, "
                "model card).",
                SaliencyDecorWarning,
                stacklevel=2,
            )

    # -- data -------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            # masks: the object masks explanation_mask_weight (RRR) trains with
            self._signature_columns = ["pixel_values", "labels", "label", "label_ids", "masks", *self.label_names]

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        """A dataset with an on-the-fly transform (``with_transform``) keeps the raw columns it reads.

        Its transform makes ``pixel_values`` from the raw columns (``image``), which ``Trainer`` would
        otherwise drop first (``KeyError: 'image'``; transformers' guide sets ``remove_unused_columns=False``
        and a collate function): the columns the model does not take are dropped after the transform.
        """
        transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
        if not self.args.remove_unused_columns or transform is None:
            return super()._remove_unused_columns(dataset, description)
        self._set_signature_columns_if_needed()
        keep = set(self._signature_columns)

        def transform_then_keep_model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
            return {key: value for key, value in transform(batch).items() if key in keep}

        return dataset.with_transform(transform_then_keep_model_inputs)  # the user's dataset is unchanged

    # -- training ---------------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        pixel_values, labels = unpack_batch(inputs)
        scale = 1.0 if self.loss_is_scaled_for_ga else 1.0 / self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            output = self.sd_step.step(
                model,
                pixel_values,
                labels,
                backward=self.accelerator.backward,
                loss_scale=scale,
                step_index=self.state.global_step,
                object_masks=inputs.get("masks") if isinstance(inputs, dict) else None,
            )
        self._training_log.update(output)
        return output.loss * scale

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (a non-finite component since the last one stops training here)
            components = self._training_log.compute(
                self.state.global_step, mean_over_processes=functools.partial(self.accelerator.reduce, reduction="mean")
            )
            logs.update({name: round(value, 6) for name, value in components.items() if name != "loss"})
        super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the last *complete* checkpoint.

        A checkpoint cut short (a killed process: no ``trainer_state.json``, which the Trainer writes
        last) is skipped with a warning instead of failing the resume.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        if not resume_from_checkpoint:
            self._refuse_or_clear_previous_run()
        if self.args.check_datasets:
            self._check_datasets()
        self._warn_if_preprocessing_unknown()
        self.sd_step.finite_watch.reset()
        result = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )
        self.sd_step.raise_if_nonfinite(step=self.state.global_step, across_processes=True)  # after the last log
        return result

    def _check_datasets(self) -> None:
        """Unreadable images and labels that do not fit the model, found before the first step (once)."""
        if getattr(self, "_datasets_checked", False):
            return
        check_training_data(self.train_dataset, self.model, "train_dataset")
        evaluation = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
        for name, dataset in evaluation.items():
            if dataset is not None:
                label = f"eval_dataset[{name!r}]" if name else "eval_dataset"
                check_training_data(dataset, self.model, label, expect_every_class=False)
        self._datasets_checked = True

    def _warn_if_preprocessing_unknown(self) -> None:
        """One warning when the training set is raw images whose transform the Trainer cannot read, and nothing
        else says how it normalises."""
        if self.training_preprocessing is not None or getattr(self, "_warned_preprocessing", False):
            return
        try:
            import datasets
        except ImportError:  # pragma: no cover - a dependency
            return
        if not isinstance(self.train_dataset, datasets.Dataset):
            return
        self._warned_preprocessing = True
        warnings.warn(
            "train_dataset is a 🤗 dataset whose transform SaliencyDecorTrainer cannot read, and neither "
            "image_mean/image_std nor a processing_class says how it normalises: saved folders record the model's "
            "default preprocessing, which evaluate, the model card and reloads will use. Set "
            "SaliencyDecorConfig(image_mean=..., image_std=..., image_crop_pct=...) to your transform's values, or "
            "pass processing_class=<the image processor your transform applies>.",
            SaliencyDecorWarning,
            stacklevel=3,
        )

    def _refuse_or_clear_previous_run(self) -> None:
        """A new run into an output_dir holding a previous run: refused, or that run's files deleted first."""
        removed = guard_previous_run(
            self.args.output_dir,
            TRAINER_RUN_FILES,
            overwrite=self.args.overwrite_output_dir,
            resume_hint="trainer.train(resume_from_checkpoint=True)",
            overwrite_hint="SaliencyDecorConfig(overwrite_output_dir=True)",
            remove=self.args.should_save,  # the main process deletes; the others only check
        )
        if self.args.overwrite_output_dir:
            self.accelerator.wait_for_everyone()
        if removed:
            logger.warning(
                "overwrite_output_dir=True: deleted the previous run's %s in %s", removed, self.args.output_dir
            )

    def _last_complete_checkpoint(self) -> str:
        from transformers.trainer_utils import sort_checkpoints

        root = self.args.output_dir
        skipped = []
        for folder in reversed(sort_checkpoints(root) if os.path.isdir(root) else []):  # newest first
            try:
                with open(os.path.join(folder, "trainer_state.json")) as handle:
                    json.load(handle)
            except (OSError, ValueError):
                skipped.append(os.path.basename(folder))
                continue
            if skipped:
                warnings.warn(
                    f"resume_from_checkpoint=True: skipped the incomplete checkpoint(s) {skipped} (no readable "
                    f"trainer_state.json: a run stopped while saving them); resuming from {folder}.",
                    SaliencyDecorWarning,
                    stacklevel=3,
                )
            return folder
        raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in output_dir {root} ({skipped=}).")

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint``; a failed save removes its half-written folder and says why (full disk)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        self.sd_step.raise_if_nonfinite(step=self.state.global_step, across_processes=True)  # never save NaN
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        existed = os.path.exists(folder)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as error:
            if self.args.should_save and not existed:
                shutil.rmtree(folder, ignore_errors=True)
            raise checkpoint.explain_save_error(error, folder) from error

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the plain model as ``Trainer`` does, plus the SaliencyDecor state (``sd_plugin.storage.checkpoint``).

        The weight file loads with plain transformers / timm / PEFT and gives the trained
        model's logits (a whitening that fed the head is folded into it); the whitening's
        running statistics and the unfolded head go to ``saliency_decor_whitening.safetensors``,
        from which resuming restores them. timm models also get timm's ``config.json``.
        """
        self.sd_step.raise_if_nonfinite(step=self.state.global_step)  # (only the saving process runs _save)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        split = checkpoint.split_state_dict(model, state_dict)
        self._warn_if_unfolded(split)
        super()._save(output_dir, split.plain)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        checkpoint.save_training_state(output_dir, split.training_only)
        metadata = {**self.saliency_decor_metadata(), "whitening_folded_into_head": split.head_folded}
        if self.training_preprocessing is not None:
            metadata["preprocessing"] = self.training_preprocessing.to_dict()
        if self._is_peft_model():  # the base the adapter needs (peft_folders: resized head, BatchNorm...)
            metadata["peft_base"] = save_adapter_base(model, output_dir)
        checkpoint.write_metadata(output_dir, metadata)
        if self.processing_class is None:  # record the preprocessing of the model training started from
            name_or_path = getattr(getattr(self.sd_adapter.base_model, "config", None), "_name_or_path", None)
            if (
                name_or_path
                and os.path.isdir(name_or_path)
                and os.path.abspath(name_or_path) != os.path.abspath(output_dir)
            ):
                checkpoint.copy_preprocessor_config([name_or_path], output_dir, metadata["input_size"])
        family = self.sd_adapter.family  # the config its library reloads the weights with (timm, PaperCNN)
        if not self._is_peft_model() or not family.reloads_by_itself:
            family.write_config(self.sd_adapter.base_model, output_dir, input_size=metadata["input_size"])
        if is_bcos(self.sd_adapter.base_model):  # bcos.json + bcos.py: the loaders B-cosify before loading
            save_bcos_files(self.sd_adapter.base_model, output_dir)
        if self.training_preprocessing is not None and family.has_image_processor:
            write_processor_normalization(output_dir, self.training_preprocessing, metadata["input_size"])

    def _warn_if_unfolded(self, split: checkpoint.SplitState) -> None:
        whitening = self.sd_adapter.whitening
        if whitening is None or not whitening.feeds_head or split.head_folded or self._warned_unfolded:
            return
        self._warned_unfolded = True
        warnings.warn(
            f"the whitening feeds head {self.sd_adapter.head_name!r}, which cannot absorb it (not a Linear with a "
            "bias in the saved weights): saved folders give the trained logits only through "
            "sd_plugin.storage.loading.load_classifier, not plain from_pretrained. Train with whiten_head_input=False "
            "for a plain checkpoint.",
            SaliencyDecorWarning,
            stacklevel=3,
        )

    def _is_peft_model(self) -> bool:
        return self.sd_adapter.model is not self.sd_adapter.base_model

    def export_source(self) -> tuple[nn.Module, dict[str, Any], Any]:
        """``(model, metadata, processor)`` for ``sd_plugin.hub.export`` (``ExportSource``)."""
        return self.accelerator.unwrap_model(self.model), self.saliency_decor_metadata(), self.processing_class

    def saliency_decor_metadata(self) -> dict[str, Any]:
        """The method's settings as trained (written to ``saliency_decor.json``)."""
        metadata = {name: getattr(self.args, name) for name in METHOD_FIELDS}
        metadata.update(self.sd_step.metadata())  # the same record the recipes' loop writes
        return metadata

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._unloaded_keys = []
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_unloaded_keys(self.model if model is None else model, resume_from_checkpoint)
        checkpoint.restore_training_state(self.sd_adapter.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._unloaded_keys = []
        super()._load_best_model()
        self._load_unloaded_keys(self.model, self.state.best_model_checkpoint)
        checkpoint.restore_training_state(self.sd_adapter.model, self.state.best_model_checkpoint)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The whitening's buffers are missing from the weight file by design (they are restored after).

        Other missing weights are loaded by ``_load_unloaded_keys`` (or refused) instead of warned of.
        """
        missing = [key for key in load_result.missing_keys if not checkpoint.is_whitening_key(key)]
        self._unloaded_keys = missing
        if not missing:
            super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_unloaded_keys(self, model: nn.Module, folder: str | None) -> None:
        """Weights the Trainer's plain ``load_state_dict`` left out: loaded with the library's key names, or refused.

        transformers 5 writes ViT checkpoints under legacy key names that ``Trainer`` does not map
        (``checkpoint.load_with_library_key_names``); training on from freshly initialised layers
        would silently not be a resume.
        """
        if not self._unloaded_keys or folder is None:
            return
        model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        still = checkpoint.load_with_library_key_names(model, folder)
        self._unloaded_keys = []
        if still:
            import transformers

            raise ValueError(
                f"the weights in {folder} do not load into the model: {len(still)} of its tensors have no value there "
                f"(e.g. {still[:3]}), so training would go on from freshly initialised layers. The folder was written "
                f"by another model or library version (this is transformers {transformers.__version__}); resume with "
                "the model class and the versions that wrote it."
            )

    # -- publishing -------------------------------------------------------------------

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No network at construction: the repository is created when the export is pushed."""
        from ..hub.push import validate_repo_id

        repo_id = self.args.hub_model_id
        if repo_id is not None and "/" in repo_id:
            validate_repo_id(repo_id)
        self.hub_model_id = repo_id

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints stay local (said once at construction); ``push_to_hub`` publishes the exported model."""

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Export (whitening folded, PEFT merged, model card) to ``output_dir/export`` and push it.

        The repository is ``args.hub_model_id`` (``user/name``). Goes through
        ``sd_plugin.hub.publish`` like the recipes' ``--push_to_hub``, and like it on several processes:
        the main one exports and pushes (returns the commit URL), the others return ``None`` once the
        folder is written. ``kwargs`` are the model card's (``create_model_card``'s: ``model_name``,
        ``finetuned_from``, ``dataset``/``dataset_name``, ``dataset_tags``, ``license``, ``language``,
        ``tags``) and ``create_pr``. The push runs to its end
        (``blocking=False`` is refused) on the default branch (a ``revision`` is refused).
        """
        from ..hub.publish import publish

        if not blocking:
            raise ValueError(
                "push_to_hub(blocking=False) is not supported: the export is pushed before push_to_hub returns. "
                "Run it in a thread (concurrent.futures) to overlap it with other work."
            )
        if revision is not None:
            raise ValueError(
                f"push_to_hub(revision={revision!r}) is not supported: the export goes to the default branch. Push "
                "the folder output_dir/export to a branch with huggingface_hub.upload_folder(revision=...)."
            )
        create_pr = bool(kwargs.pop("create_pr", False))
        card = _card_arguments("push_to_hub", kwargs)
        repo_id = self.args.hub_model_id
        if not repo_id or "/" not in repo_id:
            raise ValueError(
                f"hub_model_id={repo_id!r}: set SaliencyDecorConfig(hub_model_id='user-or-org/model-name') to push."
            )
        url = None
        if self.args.should_save:  # one writer: processes exporting into one folder would replace it under the push
            url = publish(
                self,
                os.path.join(self.args.output_dir, "export"),
                repo_id=repo_id,
                private=bool(private if private is not None else self.args.hub_private_repo),
                create_pr=create_pr,
                token=token or self.args.hub_token,
                commit_message=commit_message or "End of training",
                **card,
            ).url
        self.accelerator.wait_for_everyone()
        return url

    # -- evaluation -------------------------------------------------------------------

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """``Trainer.evaluation_loop`` plus accuracy and, when enabled, the masking test."""
        self._eval_metrics.reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        sum_over_processes = functools.partial(self.accelerator.reduce, reduction="sum")
        for name, value in self._eval_metrics.compute(sum_over_processes=sum_over_processes).items():
            output.metrics.setdefault(f"{metric_key_prefix}_{name}", value)
        if self.args.eval_masking_auc:
            output.metrics.update(
                masking_metrics_during_training(
                    self.model,
                    dataloader,
                    self.args,
                    device=self.args.device,
                    seed=self.args.seed,
                    mean_over_processes=functools.partial(self.accelerator.reduce, reduction="mean"),
                    prefix=metric_key_prefix,
                )
            )
        return output

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Plain cross-entropy forward (evaluation and prediction; no input gradients); counts accuracy."""
        pixel_values, labels = unpack_batch(inputs)
        self.sd_adapter.check_batch(pixel_values, labels)
        logits = self.sd_adapter.logits(model, pixel_values)
        loss = F.cross_entropy(logits.float(), labels)
        if not model.training:
            self._eval_metrics.update_ratio("accuracy", (logits.detach().argmax(-1) == labels).sum(), labels.numel())
        return (loss, {"logits": logits}) if return_outputs else loss

    # -- model card -------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the SaliencyDecor model card (``README.md``) to ``args.output_dir``.

        The card describes the method as trained, its hyperparameters and the last evaluation's
        metrics; ``export`` writes the same card for the published folder. ``dataset_tags`` are
        Hub dataset ids (the metadata; default: ``dataset``), ``dataset`` the names shown. ``tasks``
        other than ``image-classification`` and ``dataset_args`` are refused (the card is an image
        classifier's; it has no dataset configuration field).
        """
        from ..hub.card import render_model_card

        card = _card_arguments(
            "create_model_card",
            {
                "language": language,
                "license": license,
                "tags": tags,
                "model_name": model_name,
                "finetuned_from": finetuned_from,
                "tasks": tasks,
                "dataset_tags": dataset_tags,
                "dataset": dataset,
                "dataset_args": dataset_args,
            },
        )
        if not self.is_world_process_zero():
            return
        rendered = render_model_card(
            model_name=card.pop("model_name") or os.path.basename(os.path.abspath(self.args.output_dir)),
            library_name=self.sd_adapter.family.hub_library,
            metadata=self.saliency_decor_metadata(),
            evaluation=_last_evaluation(self.state.log_history),
            usage=self.sd_adapter.family.usage(type(self.sd_adapter.base_model).__name__),
            **card,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(rendered)


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _card_arguments(caller: str, given: dict[str, Any]) -> dict[str, Any]:
    """``Trainer.create_model_card``'s arguments as ``export`` / ``render_model_card`` take them.

    Refuses what the card cannot hold (``tasks`` other than image classification, ``dataset_args``)
    and any other keyword, naming it, instead of ignoring it.
    """
    given = {key: value for key, value in given.items() if value is not None}
    names = {"language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset"}
    names |= {"dataset_name", "dataset_args"}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"{caller}() got unsupported keyword argument(s) {unknown}; the card takes {sorted(names)}.")
    if given.get("dataset_args") is not None:
        raise ValueError(
            f"{caller}(dataset_args=...) is not supported: the SaliencyDecor card has no dataset configuration; "
            "name the dataset with dataset= (shown) and dataset_tags= (Hub ids)."
        )
    tasks = _as_list(given.get("tasks"))
    if any(task != "image-classification" for task in tasks):
        raise ValueError(
            f"{caller}(tasks={tasks!r}): the SaliencyDecor card is an image classifier's ('image-classification')."
        )
    shown = _as_list(given.get("dataset", given.get("dataset_name")))
    hub_ids = _as_list(given.get("dataset_tags")) or shown
    return {
        "model_name": given.get("model_name"),
        "base_model": given.get("finetuned_from"),
        "datasets": hub_ids or None,
        "license": given.get("license"),
        "language": given.get("language"),
        "tags": _as_list(given.get("tags")) or None,
    }


def _last_evaluation(log_history: list[dict[str, Any]]) -> dict[str, float] | None:
    """The metrics of the last evaluation in ``log_history``, keyed as the model card expects."""
    from ..hub.card import evaluation_for_card

    for entry in reversed(log_history):
        if any(key.startswith("eval_") for key in entry):
            return evaluation_for_card(entry)
    return None


def _example_inputs(dataset: Any) -> Tensor | None:
    """A one-image batch from the training set, to size features measured by a forward pass."""
    try:
        example = dataset[0]
        pixels = example["pixel_values"] if isinstance(example, dict) else example[0]
        pixels = torch.as_tensor(pixels)
    except Exception:  # noqa: BLE001 - any dataset without a usable first item: fall back to the config
        return None
    return pixels.unsqueeze(0) if pixels.dim() == 3 and pixels.is_floating_point() else None
