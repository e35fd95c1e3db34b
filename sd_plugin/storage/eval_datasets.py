"""An evaluation set by name: a built-in set, a ``save_to_disk`` folder, an image folder or a Hub id,
converted with the model's own preprocessing, and refused when its classes are not the model's."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .builtin_datasets import BUILTIN_DATASETS, load_digits_splits, load_fashion_mnist
from .image_datasets import HFImageDataset, with_channels
from .model_preprocessing import image_transform
from .tensor_datasets import TensorImageDataset

__all__ = ["check_labels_fit", "load_eval_dataset", "model_class_names"]


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
