"""The paper's small setups: the 2-layer CNN on 28x28 (MNIST-style) and CNN / ResNet-18 on 32x32.

    python recipes/paper_cnn.py --dataset fashion-mnist --method saliencydecor --output_dir outputs/fmnist-sd
    accelerate launch recipes/paper_cnn.py --dataset cifar10 --arch resnet18 --num_train_epochs 30

Defaults follow the paper: SGD (momentum 0.9), learning rate 0.01 with cosine annealing, batch
128, mask ratio 0.25, consistency weight 1; the decorrelation weight is the package's 0.001 (the
paper's 0.01 with ``--decor_weight 0.01 --decor_liveness_weight 0``, RESULTS.md §0). ``--dataset`` takes
``fashion-mnist`` (Debian's local IDX files), ``digits`` (scikit-learn), a Hub id with
``img``/``image`` and ``label`` columns (``cifar10``, ``mnist``), or ``--train_dir`` image folders.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from transformers import HfArgumentParser

from sd_plugin.core.arguments import SaliencyDecorArguments
from sd_plugin.core.models import PaperCNN
from sd_plugin.integrations.loop import train
from sd_plugin.integrations.recipe_arguments import RecipeArguments, make_accelerator
from sd_plugin.storage.builtin_datasets import load_digits_splits, load_fashion_mnist
from sd_plugin.storage.image_datasets import HFImageDataset, folder_classes, image_folder_dataset
from sd_plugin.storage.model_preprocessing import resize_and_scale


@dataclass
class PaperArguments:
    dataset: str = field(
        default="fashion-mnist", metadata={"help": "fashion-mnist, digits, a Hub id (cifar10, mnist) or 'folder'."}
    )
    arch: str = field(
        default="cnn",
        metadata={"help": "'cnn' (the paper's 2-layer CNN) or 'resnet18'.", "choices": ["cnn", "resnet18"]},
    )


def build_data(paper: PaperArguments, args: RecipeArguments, accelerator: Accelerator):
    """``(train, eval, in_chans, image_size, num_classes)``."""
    if args.train_dir:
        classes = folder_classes(args.train_dir)
        transform = resize_and_scale(32, 3)
        train_set = image_folder_dataset(args.train_dir, classes, transform)
        eval_set = image_folder_dataset(args.validation_dir, classes, transform) if args.validation_dir else None
        return train_set, eval_set, 3, 32, len(classes)
    if paper.dataset == "fashion-mnist":
        return load_fashion_mnist("train"), load_fashion_mnist("test"), 1, 28, 10
    if paper.dataset == "digits":
        train_set, test_set = load_digits_splits(image_size=28)
        return train_set, test_set, 1, 28, 10
    import datasets

    with accelerator.main_process_first():
        try:
            loaded = datasets.load_dataset(paper.dataset)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"--dataset {paper.dataset!r} could not be loaded ({type(error).__name__}).") from error
    first = loaded["train"]
    image_column = next(c for c in HFImageDataset.IMAGE_COLUMNS if c in first.column_names)
    mode = first[0][image_column].mode
    channels = 1 if mode == "L" else 3
    size = 28 if channels == 1 else 32
    convert = resize_and_scale(size, channels)
    evaluation = next((s for s in ("test", "validation", "valid") if s in loaded), None)
    label_column = next(c for c in HFImageDataset.LABEL_COLUMNS if c in first.column_names)
    num_classes = len(first.features[label_column].names)
    return (
        HFImageDataset(first, convert),
        HFImageDataset(loaded[evaluation], convert) if evaluation else None,
        channels,
        size,
        num_classes,
    )


def build_model(paper: PaperArguments, in_chans: int, image_size: int, num_classes: int) -> torch.nn.Module:
    if paper.arch == "resnet18":
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if image_size == 28:
        return PaperCNN(in_chans, num_classes, 28, (16, 8))
    return PaperCNN(in_chans, num_classes, image_size, (32, 8))


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((PaperArguments, RecipeArguments, SaliencyDecorArguments))
    parser.set_defaults(
        output_dir="outputs/paper_cnn",
        optimizer="sgd",
        learning_rate=0.01,
        momentum=0.9,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=256,
        num_train_epochs=10,
        weight_decay=5e-4,
        lr_scheduler_type="cosine",
        model="paper-cnn",
        group_size=8,
    )
    paper, args, method_args = parser.parse_args_into_dataclasses(args=argv)
    accelerator = make_accelerator(args)
    train_set, eval_set, in_chans, size, num_classes = build_data(paper, args, accelerator)
    torch.manual_seed(args.seed)
    model = build_model(paper, in_chans, size, num_classes)
    command = "python recipes/paper_cnn.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = train(args, method_args, model, train_set, eval_set, accelerator, command=command)
    accelerator.print({k: v for k, v in results.items() if k != "history"})
    return results


if __name__ == "__main__":
    main()
