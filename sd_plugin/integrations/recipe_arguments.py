"""The recipes' flags (the transformers example names) and their ``Accelerator``.

Example:
    >>> from sd_plugin.integrations.recipe_arguments import RecipeArguments
    >>> RecipeArguments(checkpointing_steps="often").validate()
    Traceback (most recent call last):
    ...
    ValueError: checkpointing_steps='often': use a number of steps or 'epoch'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.arguments import MaskingTestArguments
from ..utils.errors import SaliencyDecorWarning
from ..utils.launch_check import check_cpu_launch

__all__ = ["RecipeArguments", "make_accelerator", "scalar_values"]


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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an --output_dir that holds a previous run: delete its step_*/epoch_* checkpoints, "
            "model/ and all_results.json first (without it such a folder is refused unless --resume_from_checkpoint)."
        },
    )
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
    check_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every training and validation image once before the first step, naming unreadable "
            "files (--no_check_images skips it: the cost of one pass over the files)."
        },
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
                    f"to it; `pip install {modules[0]}`"
                    + (" (or 'sd-plugin[tracking]')." if tracker == "tensorboard" else "."),
                    SaliencyDecorWarning,
                    stacklevel=3,
                )


def make_accelerator(args: RecipeArguments) -> Any:
    """The ``Accelerator`` of a recipe: accumulation, precision, trackers, a seedable sampler.

    ``accelerate launch --cpu`` asked for several processes but given one is refused (``check_cpu_launch``).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    check_cpu_launch()
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def scalar_values(values: dict[str, Any]) -> dict[str, Any]:
    """The entries trackers and metadata can hold (numbers, strings, booleans)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
