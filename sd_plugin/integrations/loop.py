"""The Accelerate training loop shared by the recipes (``recipes/*.py``).

It runs the same ``SaliencyDecorStep`` as the Trainer, under ``accelerate launch`` on one
process or many: gradient accumulation with ``accelerator.accumulate``, the clean pass under
``no_sync`` (one gradient all-reduce per step), whitening statistics all-reduced across
processes, cosine schedule with warmup, checkpoints every N steps with ``save_state``
(written atomically, with the run's identity), exact resume (``load_state`` +
``skip_first_batches`` on a seeded sampler), evaluation (accuracy with
``gather_for_metrics`` and the masking test on a subset), trackers, a progress bar, a final
``all_results.json``, an exported model and an optional push to the Hub.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.adapter import adapt, unwrap_model
from ..core.arguments import EXECUTION_FIELDS, MaskingTestArguments, SaliencyDecorArguments
from ..core.training_log import TrainingLog
from ..core.training_step import SaliencyDecorStep
from ..evaluation.masking_curve import masking_metrics_during_training
from ..storage.checkpoint import explain_save_error
from ..utils.batches import unpack_batch
from ..utils.errors import SaliencyDecorWarning
from ..utils.meter import MetricMeter
from ..utils.run_lock import output_dir_lock

__all__ = ["RecipeArguments", "make_accelerator", "train", "apply_lora", "checkpoint_step"]

STATE_FILE = "recipe_state.json"


@dataclass
class RecipeArguments(MaskingTestArguments):
    """Flags of the recipes (the transformers example names), besides the method fields."""

    model: str = field(
        default="facebook/deit-tiny-patch16-224",
        metadata={"help": "Hub id or local folder (transformers or timm: 'timm/...', 'local-dir:PATH')."},
    )
    dataset_name: Optional[str] = field(  # noqa: UP045 - HfArgumentParser needs Optional
        default=None, metadata={"help": "Hub dataset id or save_to_disk folder."}
    )
    train_dir: Optional[str] = field(default=None, metadata={"help": "Training image folder."})  # noqa: UP045
    validation_dir: Optional[str] = field(default=None, metadata={"help": "Validation image folder."})  # noqa: UP045
    train_split: str = field(default="train", metadata={"help": "Training split of --dataset_name."})
    validation_split: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"help": "Validation split (default: valid/validation/test)."}
    )
    output_dir: str = field(default="outputs/recipe", metadata={"help": "Checkpoints, results and the model."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    optimizer: str = field(default="adamw", metadata={"help": "'adamw' or 'sgd'.", "choices": ["adamw", "sgd"]})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs (unless --max_train_steps)."})
    max_train_steps: Optional[int] = field(default=None, metadata={"help": "Total optimizer steps."})  # noqa: UP045
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps."})
    mixed_precision: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"help": "'no', 'bf16' or 'fp16' (default: accelerate's config)."}
    )
    eval_steps: Optional[int] = field(  # noqa: UP045
        default=None, metadata={"help": "Also evaluate every N optimizer steps (logged to the history and trackers)."}
    )
    image_size: Optional[int] = field(  # noqa: UP045
        default=None, metadata={"help": "Train and evaluate at this size (default: the model's preprocessing)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, more time."}
    )
    checkpoints_total_limit: Optional[int] = field(  # noqa: UP045
        default=None, metadata={"help": "Keep only the last N checkpoints (older step_*/epoch_* folders are deleted)."}
    )
    checkpointing_steps: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"help": "Save state every N steps, or 'epoch'."}
    )
    resume_from_checkpoint: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"help": "A step_N / epoch_N folder of this run, or 'latest'."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to the trackers of --report_to."})
    report_to: str = field(default="all", metadata={"help": "Trackers (tensorboard, wandb, ...), or 'all'."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})  # noqa: UP045
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the validation set."})  # noqa: UP045
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    skip_unreadable_images: bool = field(
        default=False,
        metadata={"help": "Drop image files that do not decode (each decoded once up front; one warning counts them)."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the exported model at the end."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "user/name on the Hub."})  # noqa: UP045
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository private."})
    peft: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"help": "'lora' to fine-tune LoRA adapters (head trainable).", "choices": ["lora"]}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: Optional[str] = field(  # noqa: UP045
        default=None, metadata={"help": "Comma-separated module names (default: attention q/v; CNN: last convs)."}
    )
    save_adapter: bool = field(default=False, metadata={"help": "Save the LoRA adapter instead of merging it."})

    def __post_init__(self) -> None:
        MaskingTestArguments.validate(self)  # the rest when training starts (it may warn)

    def validate(self) -> None:
        MaskingTestArguments.validate(self)
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1.")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps={self.eval_steps} must be >= 1 (or unset: evaluate at the end only).")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit={self.checkpoints_total_limit} must be >= 1 (unset: all kept).")
        if self.checkpointing_steps not in (None, "epoch") and not str(self.checkpointing_steps).isdigit():
            raise ValueError(f"checkpointing_steps={self.checkpointing_steps!r}: use a number of steps or 'epoch'.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id user-or-org/model-name.")
        if self.push_to_hub:
            from ..hub.push import validate_repo_id

            validate_repo_id(self.hub_model_id)
        if self.with_tracking:
            self._warn_missing_trackers()

    def _warn_missing_trackers(self) -> None:
        """One warning per tracker named in --report_to whose package is not installed (it would log nothing)."""
        import importlib.util
        import warnings

        packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
        for tracker in (t.strip() for t in self.report_to.split(",")):
            modules = packages.get(tracker)
            if modules and not any(importlib.util.find_spec(m) for m in modules):
                warnings.warn(
                    f"--with_tracking --report_to {tracker}: {modules[0]} is not installed, so nothing is logged "
                    f"to it; `pip install {modules[0]}`.",
                    SaliencyDecorWarning,
                    stacklevel=3,
                )


def make_accelerator(args: RecipeArguments) -> Any:
    """The ``Accelerator`` of a recipe: accumulation, precision, trackers, a seedable sampler."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _run_identity(args: RecipeArguments, method_args: SaliencyDecorArguments, num_processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: data, model, batch, seed and every method field.

    The method fields shape the state (``group_size`` the whitening buffers, ``method`` whether they
    exist) or the trajectory (``mask_ratio``, weights), so a resume under other values is refused
    up front instead of failing on a tensor shape or silently training another objective. Only the
    execution fields (``EXECUTION_FIELDS``: checks and strategies with the same values) may change.
    """
    method_fields = {k: v for k, v in sorted(_scalars(method_args.to_dict()).items()) if k not in EXECUTION_FIELDS}
    return {
        "model": args.model,
        "dataset": args.dataset_name or [args.train_dir, args.validation_dir],
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes,
        "seed": args.seed,
        "peft": args.peft,
        **method_fields,
    }


def checkpoint_step(folder: str | Path) -> int:
    """The optimizer step a ``step_N`` / ``epoch_N`` checkpoint folder was saved at."""
    state = Path(folder) / STATE_FILE
    if not state.is_file():
        raise ValueError(f"{folder} is not a checkpoint of a recipe run (no {STATE_FILE}).")
    return int(json.loads(state.read_text())["completed_steps"])


def _saved_checkpoints(output_dir: Path) -> list[Path]:
    """This run's complete checkpoints (``step_N`` / ``epoch_N`` with a state file), oldest first."""
    return sorted((p for p in output_dir.glob("*_*") if p.is_dir() and (p / STATE_FILE).is_file()), key=checkpoint_step)


def _latest_checkpoint(output_dir: Path) -> Path | None:
    saved = _saved_checkpoints(output_dir)
    return saved[-1] if saved else None


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


def _truncate(dataset: Dataset | None, limit: int | None) -> Dataset | None:
    """The first ``limit`` examples (``--max_train_samples`` / ``--max_eval_samples``)."""
    if dataset is None or limit is None or limit >= len(dataset):
        return dataset
    from torch.utils.data import Subset

    return Subset(dataset, range(limit))


def _check_arguments(args: RecipeArguments, method_args: SaliencyDecorArguments, num_processes: int) -> None:
    args.validate()
    method_args.validate()
    method_args.check_batch_size(args.per_device_train_batch_size, num_processes)
    if args.push_to_hub:  # before training, not after it
        from ..hub.push import check_push_credentials

        check_push_credentials(args.hub_model_id)


def _make_loaders(
    args: RecipeArguments, train_dataset: Dataset, eval_dataset: Dataset | None, num_processes: int
) -> tuple[DataLoader, DataLoader | None]:
    train_loader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        drop_last=num_processes > 1,
    )
    eval_loader = (
        DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, num_workers=args.num_workers)
        if eval_dataset is not None and len(eval_dataset)
        else None
    )
    return train_loader, eval_loader


def _make_scheduler(args: RecipeArguments, optimizer: torch.optim.Optimizer, max_steps: int, num_processes: int) -> Any:
    from transformers import get_scheduler

    # The prepared scheduler steps once per process at each optimizer step (accelerate's convention).
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """The entries trackers and metadata can hold (numbers, strings, booleans)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


def _make_optimizer(args: RecipeArguments, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def _atomic_save_state(
    accelerator: Any, folder: Path, completed_steps: int, identity: dict[str, Any], history: list[dict[str, float]]
) -> None:
    """``save_state`` into a temporary folder, renamed into place: a crash never leaves half a checkpoint."""
    staging = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"completed_steps": completed_steps, "identity": identity, "history": history}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
    except (OSError, RuntimeError) as error:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # no half-written checkpoint left behind
        raise explain_save_error(error, folder) from error
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate(
    accelerator: Any,
    model: nn.Module,
    adapter: Any,
    loader: DataLoader,
    masking: MaskingTestArguments,
    seed: int,
) -> dict[str, float]:
    """Accuracy over the whole validation set and the masking test (``masking``) on a fixed subset."""
    model.eval()
    meter = MetricMeter()
    for batch in loader:
        pixel_values, labels = unpack_batch(batch)
        logits = adapter.logits(model, pixel_values)
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        meter.update_ratio("eval_accuracy", (predictions == labels).sum(), labels.numel())
    metrics = meter.compute()
    metrics.update(
        masking_metrics_during_training(
            unwrap_model(model),  # no DDP for the masking test; LoRA layers live in the base model
            loader,
            masking,
            device=accelerator.device,
            seed=seed,
            mean_over_processes=functools.partial(accelerator.reduce, reduction="mean"),
        )
    )
    model.train()
    return metrics


@dataclass
class _Run:
    """What the stages of ``train`` share."""

    args: RecipeArguments
    method_args: SaliencyDecorArguments
    accelerator: Any
    model: nn.Module
    adapter: Any
    step: SaliencyDecorStep
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    eval_loader: DataLoader | None
    steps_per_epoch: int
    max_steps: int
    epochs: int
    identity: dict[str, Any]
    completed_steps: int = 0
    start_epoch: int = 0
    resume_batches: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # the whole run's, also across a resume

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


def train(
    args: RecipeArguments,
    method_args: SaliencyDecorArguments,
    model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    accelerator: Any,
    command: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` with SaliencyDecor under ``accelerator``; returns the final results.

    Four stages: ``_setup`` (data, model, step, optimizer, trackers), ``_resume`` (from a
    checkpoint of the same run), ``_train_epochs`` (steps, logging, checkpoints) and
    ``_finish`` (evaluation, ``all_results.json``, export, push).
    """
    # one run per --output_dir: a second one would overwrite this one's checkpoints and model
    with output_dir_lock(args.output_dir, enabled=accelerator.is_main_process):
        run = _setup(args, method_args, accelerator, model, (train_dataset, eval_dataset))
        if args.resume_from_checkpoint:
            _resume(run, args.resume_from_checkpoint)
        _train_epochs(run)
        return _finish(run, command)


def _setup(
    args: RecipeArguments,
    method_args: SaliencyDecorArguments,
    accelerator: Any,
    model: nn.Module,
    datasets: tuple[Dataset, Dataset | None],
) -> _Run:
    """Validate, build the loaders, the step, optimizer and schedule; prepare them for ``accelerator``."""
    from accelerate.utils import set_seed

    _check_arguments(args, method_args, accelerator.num_processes)
    set_seed(args.seed)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if args.peft == "lora":
        targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
        model = apply_lora(model, args.lora_r, args.lora_alpha, targets)
    train_dataset = _truncate(datasets[0], args.max_train_samples)
    eval_dataset = _truncate(datasets[1], args.max_eval_samples)
    if len(train_dataset) == 0:
        raise ValueError("the training set is empty.")
    example = train_dataset[0]["pixel_values"].unsqueeze(0)
    adapter = adapt(model, feature_layer=method_args.feature_layer, example_inputs=example)
    # The random mask fill draws from its own generator, reseeded from (seed, step, process) by
    # _train_epochs: resuming reproduces the masks whatever else consumed the global RNG.
    generator = torch.Generator(device=accelerator.device)
    step = SaliencyDecorStep(adapter, method_args, num_processes=accelerator.num_processes, generator=generator)
    train_loader, eval_loader = _make_loaders(args, train_dataset, eval_dataset, accelerator.num_processes)
    optimizer = _make_optimizer(args, model)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = _make_scheduler(args, optimizer, max_steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if args.with_tracking:
        accelerator.init_trackers("saliencydecor", {**_scalars(asdict(args)), **_scalars(method_args.to_dict())})
    return _Run(
        args=args,
        method_args=method_args,
        accelerator=accelerator,
        model=model,
        adapter=adapter,
        step=step,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        eval_loader=eval_loader,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        epochs=math.ceil(max_steps / max(steps_per_epoch, 1)),
        identity=_run_identity(args, method_args, accelerator.num_processes),
    )


def _identity_difference(saved: dict | None, current: dict) -> str:
    """The settings that differ between a checkpoint's run and this one, ``name: saved -> now``."""
    if saved is None or not isinstance(saved.get("identity"), dict):
        return f"it has no readable {STATE_FILE}"
    before = saved["identity"]
    changed = [
        f"{key}: {before.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}"
        for key in sorted(set(before) | set(current))
        if before.get(key) != current.get(key)
    ]
    return "it was saved with other settings (" + "; ".join(changed) + ")"


def _resume(run: _Run, checkpoint: str) -> None:
    """Load a checkpoint of this run (refused if its identity differs) and its position and history."""
    folder = Path(checkpoint)
    if checkpoint == "latest":
        folder = _latest_checkpoint(run.output_dir)
        if folder is None:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {run.output_dir}.")
    elif not folder.is_absolute() and not folder.is_dir() and (run.output_dir / folder).is_dir():
        folder = run.output_dir / folder  # `step_8`: a checkpoint of --output_dir, as `latest` finds them
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {checkpoint}: neither {folder} nor {run.output_dir / checkpoint} exists."
        )
    saved = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else None
    current = json.loads(json.dumps(run.identity))
    if saved is None or saved.get("identity") != current:
        raise ValueError(f"{folder} is not a checkpoint of this run: {_identity_difference(saved, current)}.")
    run.accelerator.load_state(str(folder))
    run.completed_steps = int(saved["completed_steps"])
    run.history = list(saved.get("history", []))
    run.start_epoch = run.completed_steps // run.steps_per_epoch
    run.resume_batches = (run.completed_steps % run.steps_per_epoch) * run.args.gradient_accumulation_steps
    run.accelerator.print(f"resumed from {folder} at step {run.completed_steps}")


def _train_epochs(run: _Run) -> None:
    """The epochs: a step per micro-batch, an optimizer step per accumulation, logs and checkpoints."""
    from tqdm.auto import tqdm

    args, accelerator, model = run.args, run.accelerator, run.model
    micro_steps = run.completed_steps * args.gradient_accumulation_steps
    progress = tqdm(total=run.max_steps, initial=run.completed_steps, disable=not accelerator.is_local_main_process)
    logger = _Logger(run, progress)
    model.train()
    for epoch in range(run.start_epoch, run.epochs):
        if hasattr(run.train_loader, "set_epoch"):
            run.train_loader.set_epoch(epoch)
        loader = run.train_loader
        if epoch == run.start_epoch and run.resume_batches:
            loader = accelerator.skip_first_batches(run.train_loader, run.resume_batches)
        for batch in loader:
            run.step.generator.manual_seed((args.seed * 1_000_003 + micro_steps) * 1024 + accelerator.process_index)
            micro_steps += 1
            with accelerator.accumulate(model):
                out = run.step.step(
                    model,
                    *unpack_batch(batch),
                    backward=accelerator.backward,
                    step_index=run.completed_steps,
                )
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            logger.window.update(out)
            if not accelerator.sync_gradients:
                continue
            run.completed_steps += 1
            progress.update(1)
            if run.completed_steps % args.logging_steps == 0 or run.completed_steps == run.max_steps:
                logger.log()
            if args.eval_steps and run.eval_loader is not None and run.completed_steps % args.eval_steps == 0:
                _evaluate_during_training(run)
            if args.checkpointing_steps and args.checkpointing_steps.isdigit():
                if run.completed_steps % int(args.checkpointing_steps) == 0:
                    _save_checkpoint(run, f"step_{run.completed_steps}")
            if run.completed_steps >= run.max_steps:
                break
        if args.checkpointing_steps == "epoch":
            _save_checkpoint(run, f"epoch_{epoch}")
        if run.completed_steps >= run.max_steps:
            break
    progress.close()


def _evaluate_during_training(run: _Run) -> None:
    """``--eval_steps``: the validation metrics at this step, in the history and the trackers."""
    metrics = evaluate(run.accelerator, run.model, run.adapter, run.eval_loader, run.args, run.args.seed)
    run.history.append({"step": run.completed_steps, **metrics})
    if run.args.with_tracking:
        run.accelerator.log(metrics, step=run.completed_steps)
    run.accelerator.print({"step": run.completed_steps, **{k: round(v, 4) for k, v in metrics.items()}})


class _Logger:
    """The step's components over a logging window (``TrainingLog``), to the history, trackers and bar."""

    def __init__(self, run: _Run, progress: Any) -> None:
        self.run, self.progress = run, progress
        self.window = TrainingLog(run.step)

    def log(self) -> None:
        run, accelerator = self.run, self.run.accelerator
        mean = functools.partial(accelerator.reduce, reduction="mean")
        logs = self.window.compute(run.completed_steps, mean_over_processes=mean)
        logs["lr"] = run.scheduler.get_last_lr()[0]
        run.history.append({"step": run.completed_steps, **logs})
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}")
        if run.args.with_tracking:
            accelerator.log(logs, step=run.completed_steps)


def _save_checkpoint(run: _Run, name: str) -> None:
    run.step.raise_if_nonfinite(step=run.completed_steps, across_processes=True)  # never save a non-finite state
    _atomic_save_state(run.accelerator, run.output_dir / name, run.completed_steps, run.identity, run.history)
    limit = run.args.checkpoints_total_limit
    if limit is not None and run.accelerator.is_main_process:
        for old in _saved_checkpoints(run.output_dir)[:-limit]:
            shutil.rmtree(old)
    run.accelerator.wait_for_everyone()


def _finish(run: _Run, command: str | None) -> dict[str, Any]:
    """Evaluate, write ``all_results.json``, export the model (and push it); returns the results."""
    args, accelerator = run.args, run.accelerator
    run.step.raise_if_nonfinite(step=run.completed_steps, across_processes=True)  # the steps after the last log
    results: dict[str, Any] = {"completed_steps": run.completed_steps, "history": run.history}
    if run.history:
        results["train_loss"] = next(h["loss"] for h in reversed(run.history) if "loss" in h)
    if run.eval_loader is not None:
        metrics = evaluate(accelerator, run.model, run.adapter, run.eval_loader, args, args.seed)
        results.update(metrics)
        if args.with_tracking:
            accelerator.log(metrics, step=run.completed_steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        method_settings = {**_scalars(run.method_args.to_dict()), **run.step.metadata()}
        _save_final(args, accelerator.unwrap_model(run.model), run.output_dir, results, command, method_settings)
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    return results


def _save_final(
    args: RecipeArguments, model: nn.Module, output_dir: Path, results: dict, command: str | None, metadata: dict
) -> None:
    from ..hub.card import evaluation_for_card
    from ..hub.publish import publish

    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    evaluation = evaluation_for_card(results)
    published = publish(
        model,
        output_dir / "model",
        repo_id=args.hub_model_id if args.push_to_hub else None,
        private=args.hub_private_repo,
        merge_adapter=not args.save_adapter,
        evaluation=evaluation,
        datasets=[args.dataset_name] if args.dataset_name else None,
        base_model=args.model if "/" in args.model and not Path(args.model).exists() else None,
        training_command=command,
        metadata=metadata,
        # the preprocessing the model was trained with: the source folder's processor config
        preprocessing_from=args.model.removeprefix("local-dir:"),
    )
    if published.url:
        print("pushed:", published.url)
