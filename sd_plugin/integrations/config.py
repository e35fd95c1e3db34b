"""``SaliencyDecorConfig``: ``transformers.TrainingArguments`` plus the method's fields.

Every ``TrainingArguments`` option keeps working (bf16, gradient accumulation,
``report_to``, ``push_to_hub``, ...). The method fields are those of
``sd_plugin.core.arguments.SaliencyDecorArguments`` (declared, documented and validated there);
this class adds the Trainer's evaluation fields: ``eval_masking_auc`` reports the masking test
(``eval_masking_auc``, ``eval_masking_auc_random``, ``eval_faithfulness_gap``) at each evaluation,
on ``eval_masking_samples`` images every ``eval_masking_step`` percent (``MaskingTestArguments``,
shared with the recipes); ``eval_accuracy`` is always reported.

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
from typing import Any, Optional

from transformers import TrainingArguments

from ..core.arguments import MaskingTestArguments, SaliencyDecorArguments

__all__ = ["SaliencyDecorConfig", "METHOD_FIELDS"]


@dataclass
class SaliencyDecorConfig(TrainingArguments, SaliencyDecorArguments, MaskingTestArguments):
    """``TrainingArguments`` with the SaliencyDecor method fields, plus the Trainer's evaluation fields."""

    eval_masking_auc: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation also report eval_masking_auc, eval_masking_auc_random and "
            "eval_faithfulness_gap (the paper's masking test) on eval_masking_samples images drawn at random "
            "(a fixed seed: the same images for every model) from the whole evaluation set."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that holds a previous run (its checkpoints, model, trainer state): "
            "delete that run's files first. Without it such a folder is refused unless training resumes "
            "(train(resume_from_checkpoint=...))."
        },
    )

    check_datasets: bool = field(
        default=True,
        metadata={
            "help": "Before the first step, decode every image of the training and evaluation sets once (🤗 image "
            "datasets, image folders) and compare their labels with the model's outputs: unreadable files are "
            "named, labels past the model's outputs refused, classes without a training example warned of. "
            "False skips it (the cost of one pass over the files)."
        },
    )

    image_mean: Optional[list[float]] = field(  # noqa: UP045 - HfArgumentParser needs Optional
        default=None,
        metadata={
            "help": "Per-channel mean of your training transform's Normalize (with image_std): recorded in every "
            "saved folder (timm's pretrained_cfg, the preprocessor config) so evaluate, the card and reloads "
            "preprocess as training did. Default: the processing_class's, else unknown (warned of)."
        },
    )
    image_std: Optional[list[float]] = field(  # noqa: UP045
        default=None, metadata={"help": "Per-channel std of your training transform's Normalize (with image_mean)."}
    )
    image_crop_pct: Optional[float] = field(  # noqa: UP045
        default=None,
        metadata={
            "help": "Resize-then-centre-crop ratio of your transform (timm's crop_pct); with image_mean/image_std "
            "the default is 1.0 (resized straight to the input size)."
        },
    )

    def __post_init__(self) -> None:
        self.validate()
        TrainingArguments.__post_init__(self)
        self.check_batch_size(self.per_device_train_batch_size, self.world_size)

    def validate(self) -> None:
        """The method fields' checks (``SaliencyDecorArguments.validate``) and the evaluation fields'."""
        SaliencyDecorArguments.validate(self)
        MaskingTestArguments.validate(self)
        if self.eval_masking_auc and self.eval_masking_samples < 1:
            raise ValueError(f"eval_masking_samples={self.eval_masking_samples} must be >= 1 with eval_masking_auc.")

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **method_fields: Any) -> SaliencyDecorConfig:
        """A config from a plain ``TrainingArguments`` (``to_dict()``, as TRL converts them) and method fields."""
        values = {k: v for k, v in args.to_dict().items() if k in cls.__dataclass_fields__}
        values["hub_token"] = args.hub_token  # to_dict() masks it
        return cls(**{**values, **method_fields})

    def method_arguments(self) -> SaliencyDecorArguments:
        """The method fields of this config as a plain ``SaliencyDecorArguments``."""
        return SaliencyDecorArguments.from_object(self)


# Fields of SaliencyDecorConfig that are not method settings: how a run treats its folder and data, and the
# training normalisation (recorded as saliency_decor.json's "preprocessing" instead).
RUN_FIELDS = ("overwrite_output_dir", "check_datasets", "image_mean", "image_std", "image_crop_pct")

# Every field the Trainer records in saliency_decor.json: the method's and the evaluation's.
METHOD_FIELDS = SaliencyDecorArguments.field_names() + tuple(
    name
    for name in SaliencyDecorConfig.__dataclass_fields__
    if name not in TrainingArguments.__dataclass_fields__
    and name not in SaliencyDecorArguments.field_names()
    and name not in RUN_FIELDS
)
