"""The Accelerate training loop shared by the recipes (``recipes/*.py``).

It runs the same ``SaliencyDecorStep`` as the Trainer, under ``accelerate launch`` on one
process or many: gradient accumulation with ``accelerator.accumulate``, the clean pass under
``no_sync`` (one gradient all-reduce per step), whitening statistics all-reduced across
processes, cosine schedule with warmup, checkpoints every N steps with ``save_state``
(``recipe_checkpoints``: written atomically, with the run's identity), exact resume
(``load_state`` + ``skip_first_batches`` on a seeded sampler), evaluation (accuracy with
``gather_for_metrics`` and the masking test on a subset), trackers, a progress bar, a final
``all_results.json``, an exported model and an optional push to the Hub (``hub.publish``).
Its flags are ``recipe_arguments.RecipeArguments``; LoRA and gradient checkpointing are
``recipe_model``'s. Every rule the Trainer also needs lives below both (the step, the logging
window, the checkpoint format, the card, publishing).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.adapter import adapt, unwrap_model
from ..core.arguments import MaskingTestArguments, SaliencyDecorArguments
from ..core.bcos import bcosify_for_training
from ..core.training_log import TrainingLog
from ..core.training_step import SaliencyDecorStep
from ..evaluation.masking_curve import masking_metrics_during_training
from ..storage.data_checks import check_training_data
from ..utils.batches import unpack_batch
from ..utils.meter import MetricMeter
from ..utils.previous_run import guard_previous_run
from ..utils.run_lock import output_dir_lock
from .recipe_arguments import RecipeArguments, scalar_values
from .recipe_checkpoints import (
    find_checkpoint,
    read_checkpoint_state,
    remove_old_checkpoints,
    run_identity,
    save_checkpoint_atomically,
)
from .recipe_model import apply_lora, enable_gradient_checkpointing

__all__ = ["RECIPE_RUN_FILES", "evaluate", "refuse_or_clear_previous_run", "train"]

# What a recipe run leaves in --output_dir (checkpoints, the final model and results): a new run into
# a folder holding any of them is refused unless it resumes or passes --overwrite_output_dir.
RECIPE_RUN_FILES = ("step_*", "epoch_*", "model", "all_results.json")


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


def _make_optimizer(args: RecipeArguments, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.learning_rate)


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
        refuse_or_clear_previous_run(args, accelerator)
        run = _setup(args, method_args, accelerator, model, (train_dataset, eval_dataset))
        if args.resume_from_checkpoint:
            _resume(run, args.resume_from_checkpoint)
        _train_epochs(run)
        return _finish(run, command)


def refuse_or_clear_previous_run(args: RecipeArguments, accelerator: Any) -> None:
    """A new run (no ``--resume_from_checkpoint``) into a folder holding a previous one is refused, or cleared.

    With ``--overwrite_output_dir`` the main process deletes the previous run's checkpoints, model and
    results first, so two runs' ``step_N`` folders never sit side by side (``latest`` could pick the old one).
    """
    if args.resume_from_checkpoint:
        return
    removed = guard_previous_run(
        args.output_dir,
        RECIPE_RUN_FILES,
        overwrite=args.overwrite_output_dir,
        resume_hint="--resume_from_checkpoint latest",
        overwrite_hint="--overwrite_output_dir",
        remove=accelerator.is_main_process,
    )
    if args.overwrite_output_dir:
        accelerator.wait_for_everyone()
    if removed:
        accelerator.print(f"--overwrite_output_dir: deleted the previous run's {removed} in {args.output_dir}")


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
    # unreadable files named before the first step (--skip_unreadable_images dropped them already)
    images = args.check_images and not args.skip_unreadable_images
    check_training_data(train_dataset, model, "the training set", check_images=images)
    if eval_dataset is not None:
        check_training_data(eval_dataset, model, "the validation set", check_images=images, expect_every_class=False)
    example = train_dataset[0]["pixel_values"].unsqueeze(0)
    if method_args.bcos_b is not None:  # in place, before the adapter finds the (B-cos) head
        bcosify_for_training(model, method_args.bcos_b, method_args.bcos_warmup_steps)
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
        settings = {**scalar_values(asdict(args)), **scalar_values(method_args.to_dict())}
        accelerator.init_trackers("saliencydecor", settings)
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
        identity=run_identity(args, method_args, accelerator.num_processes),
    )


def _resume(run: _Run, checkpoint: str) -> None:
    """Load a checkpoint of this run (refused if its identity differs) and its position and history."""
    folder = find_checkpoint(checkpoint, run.output_dir)
    saved = read_checkpoint_state(folder, run.identity)
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
                    object_masks=batch.get("masks") if isinstance(batch, dict) else None,
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
    save_checkpoint_atomically(run.accelerator, run.output_dir / name, run.completed_steps, run.identity, run.history)
    if run.accelerator.is_main_process:
        remove_old_checkpoints(run.output_dir, run.args.checkpoints_total_limit)
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
        method_settings = {**scalar_values(run.method_args.to_dict()), **run.step.metadata()}
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
