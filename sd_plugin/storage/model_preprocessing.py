"""A model's own preprocessing: PIL image -> ``(C, H, W)`` tensor as the model was trained to read it.

transformers folders use their saved ``AutoImageProcessor``, timm models their data config, and
anything else a resize and a [-1, 1] scaling (with a warning naming what was guessed).

Example:
    >>> from PIL import Image
    >>> resize_and_scale(8, 3)(Image.new("RGB", (20, 10))).shape
    torch.Size([3, 8, 8])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.errors import SaliencyDecorWarning

__all__ = ["image_transform", "resize_and_scale"]


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
