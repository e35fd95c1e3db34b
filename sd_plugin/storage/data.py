"""Image classification data: built-in offline sets, Hub ids, ``save_to_disk`` and image folders.

Every dataset here yields ``{"pixel_values": (C, H, W) float tensor, "labels": int}``.

- ``"digits"``: scikit-learn's 1,797 8x8 digits, upsampled to 16x16 (the demo's split);
- ``"fashion-mnist"``: the IDX files of Debian's ``dataset-fashion-mnist`` (or
  ``$FASHION_MNIST_DIR``), 28x28;
- a ``datasets`` ``save_to_disk`` folder, an image folder (``class/xxx.png``), or a Hub id,
  converted with the model's own preprocessing (``image_transform``).
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..utils.errors import SaliencyDecorWarning
from .tensor_datasets import TensorImageDataset

__all__ = [
    "BUILTIN_DATASETS",
    "TensorImageDataset",
    "HFImageDataset",
    "load_digits_splits",
    "load_fashion_mnist",
    "load_eval_dataset",
    "image_transform",
    "resize_and_scale",
]

BUILTIN_DATASETS = ("digits", "cluttered-digits", "fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def load_digits_splits(
    image_size: int = 16, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's digits, upsampled to ``image_size``, scaled to [-1, 1]; a fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_count = int(round(test_fraction * len(labels)))
    test, train = order[:test_count], order[test_count:]
    return TensorImageDataset(images[train], labels[train]), TensorImageDataset(images[test], labels[test])


def _read_idx(path: Path) -> Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory / stem}(.gz) not found: install Fashion-MNIST with `apt-get install -y "
        "dataset-fashion-mnist` or set FASHION_MNIST_DIR to a folder with its IDX files."
    )


def load_fashion_mnist(
    split: str = "train", directory: str | Path | None = None, limit: int | None = None
) -> TensorImageDataset:
    """Fashion-MNIST from its IDX files, 1x28x28 scaled to [-1, 1] (``split``: train/test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; use 'train' or 'test'.")
    root = Path(directory or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).long()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = (images.float().unsqueeze(1) / 255.0 - 0.5) / 0.5
    return TensorImageDataset(pixels, labels)


def image_transform(
    model: nn.Module, directory: str | Path | None = None, image_size: int | None = None
) -> Callable[[Any], Tensor]:
    """PIL image -> ``(C, H, W)`` tensor with the model's own preprocessing.

    transformers: the ``AutoImageProcessor`` saved with the model; timm: its data config
    (``pretrained_cfg``, which the package's folders write at the size trained at); otherwise:
    convert to the model's channel count, resize to its input size, scale to [-1, 1]. A
    folder's ``saliency_decor.json`` ``input_size`` (the training batches' size) wins over a
    guessed size, and a folder without a recorded preprocessing gets a warning that says what
    was guessed. ``image_size`` overrides the size (square), keeping the normalisation.
    """
    from ..core.adapter import expected_channels, unwrap_model
    from ..core.families import TimmFamily, family_of
    from .checkpoint import read_metadata

    base = unwrap_model(model)
    channels = expected_channels(base) or 3
    mode = "RGB" if channels == 3 else "L"
    metadata = (read_metadata(directory) if directory is not None else None) or {}
    trained = tuple(metadata["input_size"]) if metadata.get("input_size") else None
    if image_size:
        trained = (channels, int(image_size), int(image_size))
    if directory is not None and (Path(directory) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(directory))
        if image_size:
            _resize_processor(processor, int(image_size))
        return lambda image: processor(image.convert(mode), return_tensors="pt")["pixel_values"][0]
    timm_model = getattr(base, "timm_model", base)
    if isinstance(family_of(timm_model), TimmFamily):
        import timm.data

        config = timm.data.resolve_data_config(model=timm_model)
        if trained and tuple(config["input_size"]) != trained and not image_size:
            _warn_guessed(directory, f"timm's data config says {config['input_size'][1:]} px; using the trained size")
        if trained and tuple(config["input_size"]) != trained:
            config = timm.data.resolve_data_config({"input_size": trained}, model=timm_model)
        transform = timm.data.create_transform(**config)
        return lambda image: transform(image.convert(mode))
    size = trained[-1] if trained else (getattr(getattr(base, "config", None), "image_size", None) or 224)
    if directory is not None:
        _warn_guessed(directory, f"resizing to {size} px and scaling to [-1, 1]")
    return resize_and_scale(size, channels)


def _resize_processor(processor: Any, size: int) -> None:
    """Make a transformers image processor output ``size x size`` images (fixed size or resize + crop)."""
    from .checkpoint import fitted_processor_size

    current = dict(getattr(processor, "size", None) or {})
    for name, value in fitted_processor_size(current, getattr(processor, "crop_size", None), size, size).items():
        setattr(processor, name, value)


def _warn_guessed(directory: str | Path | None, what: str) -> None:
    warnings.warn(
        f"{directory} records no preprocessing (no preprocessor_config.json): {what}. If the model was trained "
        "with another transform, every score is wrong. Save the image processor with the model "
        "(SaliencyDecorTrainer(processing_class=...), processor.save_pretrained(folder)).",
        SaliencyDecorWarning,
        stacklevel=3,
    )


def resize_and_scale(size: int, channels: int) -> Callable[[Any], Tensor]:
    """PIL image -> ``(channels, size, size)`` tensor in [-1, 1] (grey for 1 channel, else RGB)."""
    from torchvision.transforms import v2

    mode = "RGB" if channels == 3 else "L"
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * channels, [0.5] * channels),
        ]
    )
    return lambda image: transform(image.convert(mode))


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


def load_eval_dataset(
    name_or_path: str, split: str | None, model: nn.Module, model_directory: str | Path | None = None
) -> Dataset:
    """An evaluation set: a built-in name, a ``save_to_disk`` folder, an image folder or a Hub id."""
    if name_or_path in BUILTIN_DATASETS:
        test_split = split in (None, "test", "validation")
        size = _trained_size(model, model_directory)
        if name_or_path == "digits":
            builtin = load_digits_splits(image_size=size or 16)[1 if test_split else 0]
        elif name_or_path == "cluttered-digits":  # the demo's ground truth, masks included
            from .cluttered_digits import cluttered_digits_splits

            builtin = cluttered_digits_splits(canvas_size=size or 20)[1 if test_split else 0]
        else:
            builtin = load_fashion_mnist("test" if test_split else "train")
            if size and size != builtin.images.shape[-1]:  # the size trained at, as image folders get it
                resized = F.interpolate(builtin.images, size=(size, size), mode="bilinear", align_corners=False)
                builtin = TensorImageDataset(resized, builtin.labels)
        check_labels_fit(model, 10, None, name_or_path)
        converted = with_channels(builtin, _model_channels(model))
        converted.split = "test" if test_split else "train"  # the split loaded, recorded by evaluate
        return converted
    import datasets

    path = Path(name_or_path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        try:
            loaded = datasets.load_dataset(name_or_path)
        except Exception as error:  # noqa: BLE001 - offline/unknown ids raise many types
            raise ValueError(
                f"could not load dataset {name_or_path!r}: not a built-in ({BUILTIN_DATASETS}), not a folder, "
                f"and the Hub did not provide it ({type(error).__name__}). Offline, pass a save_to_disk or "
                "image folder."
            ) from error
    chosen = split
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or next((s for s in ("test", "validation", "valid", "val") if s in names), names[0])
        if chosen not in names:
            raise ValueError(f"split={chosen!r} is not in the dataset; its splits are {names}.")
        loaded = loaded[chosen]
    evaluation_set = HFImageDataset(loaded, image_transform(model, model_directory))
    evaluation_set.split = chosen or str(getattr(loaded, "split", None) or "") or None
    names = evaluation_set.class_names()
    count = len(names) if names else int(max(loaded[evaluation_set.label_column])) + 1
    check_labels_fit(model, count, names, name_or_path)
    return evaluation_set


def _trained_size(model: nn.Module, directory: str | Path | None) -> int | None:
    """The square side the model takes: the folder's recorded ``input_size``, else its config's ``image_size``.

    ``None`` when neither says (a model that takes any size, as CNNs do).
    """
    from ..core.adapter import unwrap_model
    from .checkpoint import read_metadata

    metadata = (read_metadata(directory) if directory is not None else None) or {}
    if metadata.get("input_size"):
        height, width = metadata["input_size"][-2:]
        if height != width:
            raise ValueError(
                f"{directory} was trained on {height}x{width} images; the built-in datasets are square. Evaluate "
                "on a dataset folder of that size instead."
            )
        return int(height)
    image_size = getattr(getattr(unwrap_model(model), "config", None), "image_size", None)
    return int(image_size) if isinstance(image_size, int) else None


def _model_channels(model: nn.Module) -> int | None:
    from ..core.adapter import expected_channels, unwrap_model

    return expected_channels(unwrap_model(model))


def model_class_names(model: nn.Module) -> tuple[int | None, list[str] | None]:
    """``(number of outputs, class names)`` a classifier declares (names None when generic, e.g. LABEL_0)."""
    from ..core.adapter import unwrap_model

    base = unwrap_model(model)
    config = getattr(base, "config", None)
    timm_model = getattr(base, "timm_model", base)
    count = getattr(config, "num_labels", None) or getattr(timm_model, "num_classes", None)
    names = None
    id2label = getattr(config, "id2label", None)
    if id2label:
        names = [str(id2label[i]) for i in sorted(id2label)]
    else:  # timm: pretrained_cfg["label_names"], when there is one name per output
        from ..core.families import timm_label_names

        names = timm_label_names(timm_model)
    if names and all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        names = None
    return (int(count) if count else None), (list(names) if names else None)


def check_labels_fit(model: nn.Module, count: int, names: list[str] | None, dataset: str) -> None:
    """Refuse an evaluation set whose classes are not the model's: names where both have them, else counts."""
    model_count, model_names = model_class_names(model)
    if names and model_names and list(names) != list(model_names):
        raise ValueError(
            f"dataset {dataset!r} has the classes {names[:5]}{'...' if len(names) > 5 else ''} but the model was "
            f"trained for {model_names[:5]}{'...' if len(model_names) > 5 else ''}: the labels would not mean the "
            "same thing. Evaluate on data with the model's classes, in its order."
        )
    if model_count is not None and count != model_count:
        raise ValueError(
            f"dataset {dataset!r} has {count} classes but the model has {model_count} outputs; evaluate on data "
            "with the model's classes (a subset would be scored against the wrong labels)."
        )


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
