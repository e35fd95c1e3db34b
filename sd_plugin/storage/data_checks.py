"""Bad training data found before the first step: unreadable image files, classes the model has no data for.

``check_training_data(dataset, model, argument)`` looks at a 🤗 ``datasets.Dataset`` (an
``imagefolder`` set, with or without ``with_transform``) or the package's own image datasets, and
does nothing for other datasets (in-memory tensors cannot be unreadable):

- every image is decoded once; unreadable files (truncated, empty, not an image) are named in one
  ``UnreadableImageError`` with the fix, instead of a bare ``OSError`` at some later step;
- a label the model has no output for is an error; a model class with no example in a training set
  (an empty class folder, which ``datasets`` drops) is a warning naming it.

Example:
    >>> import datasets, torch
    >>> data = datasets.Dataset.from_dict({"label": [0, 1, 0]}).cast_column(
    ...     "label", datasets.ClassLabel(names=["cat", "dog"]))
    >>> model = torch.nn.Linear(2, 3)  # 3 outputs, classes 0-2
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check_training_data(data, model, "train_dataset", num_labels=3)
    >>> "class 2 has no example" in str(caught[0].message)
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..utils.errors import SaliencyDecorWarning
from .eval_datasets import model_class_names
from .image_datasets import SKIP_HINT, HFImageDataset, ImagePathDataset, UnreadableImageError, readable_image

__all__ = ["check_training_data", "label_counts", "stored_labels", "unreadable_images"]

_SHOWN = 5


def _unwrap(dataset: Any) -> tuple[Any, list[int] | None]:
    """``(the dataset under a torch Subset, the subset's indices or None)``."""
    from torch.utils.data import Subset

    indices = None
    while isinstance(dataset, Subset):
        inner = list(dataset.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _samples(dataset: Any) -> list[tuple[Any, int]] | None:
    """The ``(path, label)`` pairs of an ``ImagePathDataset`` (or a subset of one), else None."""
    base, indices = _unwrap(dataset)
    if not isinstance(base, ImagePathDataset):
        return None
    return base.samples if indices is None else [base.samples[i] for i in indices]


def _hf_dataset(dataset: Any) -> Any | None:
    """The 🤗 ``datasets.Dataset`` under ``dataset`` (itself, an ``HFImageDataset``'s, a subset), without transform."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        return None
    base, indices = _unwrap(dataset)
    if isinstance(base, HFImageDataset):
        base = base.dataset
    if not isinstance(base, datasets.Dataset):
        return None
    base = base.with_format(None)  # the raw columns: a with_transform transform would decode every image
    return base if indices is None else base.select(indices)


def _column(dataset: Any, candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in dataset.column_names), None)


def stored_labels(dataset: Any) -> list[Any] | None:
    """Every label of ``dataset`` in order, read without decoding an image; None where they are not kept apart.

    Image-path datasets (their ``samples``), 🤗 datasets (the label column), tensor datasets (a 1-D
    ``labels`` tensor, ``TensorDataset``) and ``Subset``s of any of these.

    Example:
        >>> from torch.utils.data import Subset, TensorDataset
        >>> stored_labels(Subset(TensorDataset(torch.zeros(4, 1), torch.tensor([3, 1, 2, 0])), [1, 3]))
        [1, 0]
    """
    samples = _samples(dataset)
    if samples is not None:
        return [label for _, label in samples]
    raw = _hf_dataset(dataset)
    if raw is not None:
        column = _column(raw, HFImageDataset.LABEL_COLUMNS)
        return list(raw[column]) if column is not None else None
    base, indices = _unwrap(dataset)
    labels = getattr(base, "labels", None)
    tensors = getattr(base, "tensors", None)  # TensorDataset
    if not (isinstance(labels, torch.Tensor) and labels.dim() == 1):
        labels = tensors[1] if tensors is not None and len(tensors) >= 2 else None
    if labels is None or len(labels) != len(base):
        return None
    values = labels.tolist()
    return values if indices is None else [values[i] for i in indices]


def unreadable_images(dataset: Any) -> tuple[list[str], int]:
    """``(files that do not decode, images checked)``; ``([], 0)`` for a dataset without image files."""
    samples = _samples(dataset)
    if samples is not None:
        return [str(path) for path, _ in samples if not readable_image(path)], len(samples)
    raw = _hf_dataset(dataset)
    if raw is None:
        return [], 0
    import datasets

    column = _column(raw, HFImageDataset.IMAGE_COLUMNS)
    if column is None or not isinstance(raw.features.get(column), datasets.Image):
        return [], 0
    records = raw.cast_column(column, datasets.Image(decode=False))[column]
    bad = [str(record.get("path") or f"example {i}") for i, record in enumerate(records) if not readable_image(record)]
    return bad, len(records)


def label_counts(dataset: Any) -> tuple[torch.Tensor | None, list[str] | None]:
    """``(examples per label, the dataset's class names)``; ``(None, None)`` when its labels cannot be read cheaply."""
    if _samples(dataset) is not None:
        names = list(_unwrap(dataset)[0].classes)
    else:
        raw = _hf_dataset(dataset)
        if raw is None:  # in-memory tensors: nothing a folder could have got wrong
            return None, None
        column = _column(raw, HFImageDataset.LABEL_COLUMNS)
        names = list(getattr(raw.features.get(column), "names", None) or []) or None if column else None
    labels = stored_labels(dataset)
    if labels is None:
        return None, names
    try:
        values = torch.as_tensor(labels, dtype=torch.long)
    except (TypeError, ValueError):  # not one integer per example (multi-label, strings): not checked here
        return None, names
    if values.dim() != 1 or values.numel() == 0 or int(values.min()) < 0:
        return None, names
    return torch.bincount(values, minlength=len(names or [])), names


def check_training_data(
    dataset: Any,
    model: nn.Module,
    argument: str,
    num_labels: int | None = None,
    check_images: bool = True,
    expect_every_class: bool = True,
) -> None:
    """Refuse unreadable images and labels the model has no output for; warn of classes without examples.

    Args:
        argument: how the caller names the dataset in errors (``train_dataset``, ``--train_dir``).
        num_labels: the model's output count (default: read from the model).
        check_images: decode every image once (the cost of one pass over the files).
        expect_every_class: warn when a model class has no example (a training set; not an evaluation subset).
    """
    if check_images:
        bad, total = unreadable_images(dataset)
        if bad:
            shown = ", ".join(bad[:_SHOWN]) + (f", ... ({len(bad)} in all)" if len(bad) > _SHOWN else "")
            raise UnreadableImageError(
                f"{argument}: {len(bad)} of {total} images do not decode: {shown}{SKIP_HINT} "
                "(SaliencyDecorTrainer: filter them out of the dataset, or check_datasets=False to skip this check.)"
            )
    counts, names = label_counts(dataset)
    if counts is None:
        return
    outputs = num_labels or model_class_names(model)[0]
    if outputs is None:
        return
    if counts.numel() > outputs and int(counts[outputs:].sum()) > 0:
        top = int(torch.nonzero(counts).max())
        raise ValueError(
            f"{argument} has labels up to {top} but the model has {outputs} outputs: build the model with "
            f"num_labels={top + 1} (transformers) / num_classes={top + 1} (timm), or drop those examples."
        )
    if expect_every_class:
        counts = torch.nn.functional.pad(counts, (0, max(0, outputs - counts.numel())))[:outputs]
        missing = torch.nonzero(counts == 0).flatten().tolist()
        if missing:
            _, model_names = model_class_names(model)
            labels = [
                f"{i} ({model_names[i]!r})" if model_names and i < len(model_names) else str(i)
                for i in missing[:_SHOWN]
            ]
            dataset_classes = f" (its classes: {names[:_SHOWN]}{'...' if len(names) > _SHOWN else ''})" if names else ""
            warnings.warn(
                f"{argument}: model class {', '.join(labels)} has no example{dataset_classes}; the model has "
                f"{outputs} outputs. An empty class folder is dropped by `datasets` (so the classes shift), and "
                "a class never seen in training is never predicted. Add its images, or build the model with the "
                "dataset's classes.",
                SaliencyDecorWarning,
                stacklevel=3,
            )
