"""Fine-tune a Hub (or local) DeiT / ResNet on Tiny ImageNet with SaliencyDecor, on 1..N GPUs.

    accelerate launch recipes/tiny_imagenet.py --model facebook/deit-tiny-patch16-224 \\
        --dataset_name zh-plus/tiny-imagenet --output_dir outputs/deit-tiny-sd \\
        --per_device_train_batch_size 128 --num_train_epochs 10 --learning_rate 5e-5 --mixed_precision bf16
    accelerate launch recipes/tiny_imagenet.py --model timm/resnet18.a1_in1k \\
        --train_dir tiny-imagenet-200/train --validation_dir tiny-imagenet-200/val --peft lora

Models: transformers ids/folders (``facebook/deit-tiny-patch16-224``, ``microsoft/resnet-18``)
or timm (``timm/deit_tiny_patch16_224.fb_in1k``, ``timm/resnet18.a1_in1k``, ``local-dir:PATH``),
with a new head for the dataset's classes. Data: a Hub id (``zh-plus/tiny-imagenet``: splits
``train``/``valid``), a ``save_to_disk`` folder, or image folders (the raw
``tiny-imagenet-200`` layout included). Every method field of ``SaliencyDecorConfig`` is a
flag (``--method``, ``--mask_ratio``, ``--decor_weight``, ...).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from accelerate import Accelerator
from transformers import HfArgumentParser

from sd_plugin.core.arguments import SaliencyDecorArguments
from sd_plugin.integrations.loop import refuse_or_clear_previous_run, train
from sd_plugin.integrations.recipe_arguments import RecipeArguments, make_accelerator
from sd_plugin.storage.image_datasets import HFImageDataset, folder_classes, image_folder_dataset
from sd_plugin.storage.loading import load_for_finetuning
from sd_plugin.storage.model_preprocessing import image_transform
from sd_plugin.utils.run_lock import output_dir_lock

DEFAULT_DATASET = "zh-plus/tiny-imagenet"


def _hub_splits(args: RecipeArguments):
    import datasets

    path = Path(args.dataset_name)
    try:
        loaded = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(args.dataset_name)
    except Exception as error:  # noqa: BLE001 - offline and unknown ids raise many types
        raise ValueError(
            f"--dataset_name {args.dataset_name!r} could not be loaded ({type(error).__name__}); pass a Hub dataset "
            "id (e.g. zh-plus/tiny-imagenet), a save_to_disk folder, or --train_dir/--validation_dir image folders."
        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"--dataset_name {args.dataset_name!r} has no splits; save it as a DatasetDict.")
    names = list(loaded)
    if args.train_split not in names:
        raise ValueError(f"--train_split {args.train_split!r} is not a split of the dataset; it has {names}.")
    validation = args.validation_split or next((s for s in ("valid", "validation", "val", "test") if s in names), None)
    if validation is not None and validation not in names:
        raise ValueError(f"--validation_split {validation!r} is not a split of the dataset; it has {names}.")
    return loaded[args.train_split], loaded[validation] if validation else None


def _labels_of(dataset) -> list[str]:
    column = next((c for c in HFImageDataset.LABEL_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise ValueError(
            f"the dataset has columns {dataset.column_names} but no label column "
            f"(one of {HFImageDataset.LABEL_COLUMNS})."
        )
    feature = dataset.features[column]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    return [str(i) for i in range(int(max(dataset[column])) + 1)]


def build(args: RecipeArguments, accelerator: Accelerator):
    """``(model, train_dataset, eval_dataset)`` from the flags."""
    if args.train_dir:
        with accelerator.main_process_first():
            classes = folder_classes(args.train_dir)
        model = load_for_finetuning(args.model, len(classes), classes)
        transform = image_transform(model, _processor_source(args.model), args.image_size)
        train_set = image_folder_dataset(args.train_dir, classes, transform)
        eval_set = image_folder_dataset(args.validation_dir, classes, transform) if args.validation_dir else None
    else:
        args.dataset_name = args.dataset_name or DEFAULT_DATASET
        with accelerator.main_process_first():
            train_split, eval_split = _hub_splits(args)
        classes = _labels_of(train_split)
        model = load_for_finetuning(args.model, len(classes), classes)
        transform = image_transform(model, _processor_source(args.model), args.image_size)
        train_set = HFImageDataset(train_split, transform)
        eval_set = HFImageDataset(eval_split, transform) if eval_split is not None else None
    if args.skip_unreadable_images:
        with accelerator.main_process_first():
            train_set = train_set.without_unreadable()
            eval_set = eval_set.without_unreadable() if eval_set is not None else None
    return model, train_set, eval_set


def _processor_source(model: str) -> str | None:
    path = Path(model.removeprefix("local-dir:"))
    return str(path) if path.is_dir() else None


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RecipeArguments, SaliencyDecorArguments))
    parser.set_defaults(output_dir="outputs/tiny_imagenet")
    args, method_args = parser.parse_args_into_dataclasses(args=argv)
    accelerator = make_accelerator(args)
    command = "accelerate launch recipes/tiny_imagenet.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with output_dir_lock(args.output_dir, enabled=accelerator.is_main_process):  # refused before loading anything
        refuse_or_clear_previous_run(args, accelerator)  # a finished run is resumed or overwritten, never mixed
        model, train_set, eval_set = build(args, accelerator)
        results = train(args, method_args, model, train_set, eval_set, accelerator, command=command)
    accelerator.print({k: v for k, v in results.items() if k != "history"})
    return results


if __name__ == "__main__":
    main()
