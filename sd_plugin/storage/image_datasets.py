"""Image datasets read lazily from files: 🤗 ``datasets`` sets, image folders (Tiny-ImageNet's raw
layout too), unreadable-file handling, and grey <-> RGB conversion to fit a model.

Each yields ``{"pixel_values": (C, H, W) float tensor, "labels": int}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..utils.errors import SaliencyDecorWarning

__all__ = [
    "ChannelConverted",
    "HFImageDataset",
    "IMAGE_EXTENSIONS",
    "ImagePathDataset",
    "SKIP_HINT",
    "UnreadableImageError",
    "folder_classes",
    "image_folder_dataset",
    "readable_image",
    "with_channels",
]


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif")


SKIP_HINT = (
    ". Remove or replace the file, or skip unreadable images (recipes: --skip_unreadable_images; "
    "evaluate: --skip-unreadable-images)."
)


class UnreadableImageError(OSError):
    """An image file that does not decode (truncated, empty, not an image); the message names it."""


def readable_image(image: Any) -> bool:
    """True when a path, or a ``datasets`` ``{"path", "bytes"}`` record, decodes as an image."""
    import io

    from PIL import Image

    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
    try:
        with Image.open(image) as opened:
            opened.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _warn_skipped(paths: list[Any], total: int) -> None:
    shown = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    warnings.warn(
        f"skipped {len(paths)} of {total} images that do not decode: {shown}", SaliencyDecorWarning, stacklevel=3
    )


class HFImageDataset(Dataset):
    """A ``datasets.Dataset`` with an image and a label column, as ``pixel_values``/``labels``."""

    IMAGE_COLUMNS = ("image", "img", "pixel_values")
    LABEL_COLUMNS = ("label", "labels", "fine_label")

    def __init__(self, dataset: Any, transform: Callable[[Any], Tensor]) -> None:
        columns = list(dataset.column_names)
        self.image_column = next((c for c in self.IMAGE_COLUMNS if c in columns), None)
        self.label_column = next((c for c in self.LABEL_COLUMNS if c in columns), None)
        if self.image_column is None:
            raise ValueError(f"the dataset has columns {columns} but no image column (one of {self.IMAGE_COLUMNS}).")
        if self.label_column is None:
            raise ValueError(f"the dataset has columns {columns} but no label column (one of {self.LABEL_COLUMNS}).")
        self.dataset = dataset
        self.transform = transform
        self._check_labels()

    def _check_labels(self) -> None:
        """Refuse labels below 0 up front (``datasets`` writes -1 for "no label", e.g. an unlabelled test split)."""
        labels = torch.as_tensor(list(self.dataset[self.label_column])) if len(self.dataset) else torch.zeros(0)
        if labels.numel() and int(labels.min()) < 0:
            count = int((labels < 0).sum())
            raise ValueError(
                f"the dataset's {self.label_column!r} column holds {int(labels.min())} for {count} of {labels.numel()} "
                "examples: a label below 0 (datasets' 'no label', as in unlabelled test splits) cannot be trained on "
                f"or scored. Use a labelled split, or filter: dataset.filter(lambda x: x[{self.label_column!r}] >= 0)."
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def class_names(self) -> list[str] | None:
        """The label column's class names (a ``ClassLabel`` feature), or None."""
        feature = getattr(self.dataset, "features", {}).get(self.label_column)
        names = getattr(feature, "names", None)
        return list(names) if names else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            row = self.dataset[index]
        except (OSError, SyntaxError) as error:  # PIL decodes lazily: truncated / not an image
            raise UnreadableImageError(f"{self.image_path(index)} (example {index}): {error}{SKIP_HINT}") from error
        image = row[self.image_column]
        pixels = image if isinstance(image, Tensor) else self.transform(image)
        return {"pixel_values": pixels, "labels": int(row[self.label_column])}

    def image_path(self, index: int) -> str:
        """The file an example's image was read from (``datasets``' image feature), or ``example <index>``."""
        try:
            import datasets

            raw = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))[index][self.image_column]
            return str(raw.get("path") or f"example {index}")
        except Exception:  # noqa: BLE001 - only for the error message
            return f"example {index}"

    def without_unreadable(self) -> HFImageDataset:
        """This dataset without the examples whose image does not decode (one warning counts them)."""
        import datasets

        raw = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))
        bad = [i for i, row in enumerate(raw) if not readable_image(row[self.image_column])]
        if not bad:
            return self
        _warn_skipped([raw[i][self.image_column].get("path") or f"example {i}" for i in bad], len(self))
        keep = sorted(set(range(len(self))) - set(bad))
        return HFImageDataset(self.dataset.select(keep), self.transform)


class ImagePathDataset(Dataset):
    """``(path, label)`` pairs read lazily as ``{"pixel_values", "labels"}``.

    A file that does not decode raises ``UnreadableImageError`` naming it;
    ``without_unreadable()`` drops such files up front (decoding each once) with one warning.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: Callable[[Any], Tensor]):
        self.samples = samples
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, SyntaxError) as error:
            raise UnreadableImageError(f"{path}: {error}{SKIP_HINT}") from error
        return {"pixel_values": self.transform(image), "labels": label}

    def without_unreadable(self) -> ImagePathDataset:
        """This dataset without the files that do not decode (one warning counts them)."""
        bad = [path for path, _ in self.samples if not readable_image(path)]
        if not bad:
            return self
        _warn_skipped(bad, len(self.samples))
        dropped = set(bad)
        return ImagePathDataset([s for s in self.samples if s[0] not in dropped], self.classes, self.transform)


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_classes(train_dir: str | Path) -> list[str]:
    """Class names of an image folder (its sub-folders that hold images), sorted."""
    root = Path(train_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [p.name for p in folders if _images_in(p)]
    if not classes:
        raise ValueError(
            f"{root} holds no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)}); expected "
            "<class>/<image> (or Tiny ImageNet's <wnid>/images/<image>)."
        )
    empty = [p.name for p in folders if p.name not in classes]
    if empty:
        raise ValueError(
            f"{root}: the class folder(s) {empty[:5]} hold no images ({', '.join(IMAGE_EXTENSIONS)}); add their "
            "training images or remove the folders."
        )
    if len(classes) < 2:
        raise ValueError(
            f"{root} holds one class ({classes[0]!r}): a classifier needs at least 2 (its accuracy would be 100% and "
            "every saliency score meaningless). Expected one sub-folder per class."
        )
    return classes


def image_folder_dataset(
    directory: str | Path, classes: list[str], transform: Callable[[Any], Tensor]
) -> ImagePathDataset:
    """An image folder split, including the raw ``tiny-imagenet-200`` layout.

    ``<class>/**/<image>`` folders (Tiny ImageNet's ``train/<wnid>/images/*.JPEG`` too), or
    a flat folder of images with ``val_annotations.txt`` (Tiny ImageNet's ``val/``:
    ``images/<file>`` and lines ``<file> <wnid> ...``). Labels index ``classes``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist.")
    index = {name: i for i, name in enumerate(classes)}
    annotations = root / "val_annotations.txt"
    samples: list[tuple[Path, int]] = []
    if annotations.is_file():
        image_root = root / "images" if (root / "images").is_dir() else root
        for line in annotations.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise ValueError(f"{annotations}: class {parts[1]!r} of {parts[0]} is not a training class.")
            samples.append((image_root / parts[0], index[parts[1]]))
    else:
        for name in sorted(p.name for p in root.iterdir() if p.is_dir()):
            if name not in index and _images_in(root / name):
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                raise ValueError(
                    f"{root / name} is not one of the {len(classes)} training classes ({shown}): this split has a "
                    "class the training folder lacks (or whose training folder is empty)."
                )
            samples += [(path, index[name]) for path in _images_in(root / name)]
    if not samples:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    missing = [str(path) for path, _ in samples[:1000] if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} annotated images are missing, e.g. {missing[0]}.")
    return ImagePathDataset(samples, classes, transform)


class ChannelConverted(Dataset):
    """``dataset`` with grey images repeated to 3 channels or RGB averaged to 1, to fit the model."""

    def __init__(self, dataset: Dataset, channels: int) -> None:
        self.dataset, self.channels = dataset, channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        pixels = example["pixel_values"]
        if pixels.shape[0] == 1 and self.channels == 3:
            example["pixel_values"] = pixels.expand(3, *pixels.shape[1:]).clone()
        elif pixels.shape[0] == 3 and self.channels == 1:
            example["pixel_values"] = pixels.mean(0, keepdim=True)
        return example


def with_channels(dataset: Dataset, channels: int | None) -> Dataset:
    """``dataset`` converted to ``channels`` when its images have another count (1 <-> 3)."""
    if channels is None or len(dataset) == 0:
        return dataset
    have = dataset[0]["pixel_values"].shape[0]
    return dataset if have == channels else ChannelConverted(dataset, channels)
