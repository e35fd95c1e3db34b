"""The preprocessing a model was trained with, recorded where its library (and ``evaluate``, the card) reads it.

A Trainer cannot see inside a dataset's transform, so the normalisation comes from what the user
says: ``SaliencyDecorConfig(image_mean=..., image_std=..., image_crop_pct=...)`` or the
``processing_class`` (an image processor with ``image_mean`` / ``image_std``). ``TrainingPreprocessing``
holds it; ``apply_to_timm_model`` writes it into a timm model's ``pretrained_cfg`` (so timm's
``config.json``, ``resolve_data_config`` and the exported card follow it) and
``write_processor_normalization`` into a transformers folder's ``preprocessor_config.json``.

Example:
    >>> record = TrainingPreprocessing.resolve([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], None, None)
    >>> record.mean, record.crop_pct, record.source
    ((0.5, 0.5, 0.5), 1.0, 'image_mean/image_std')
    >>> import timm
    >>> model = timm.create_model("resnet10t", num_classes=2)
    >>> apply_to_timm_model(model, record)
    >>> timm.data.resolve_data_config(model=model)["mean"], model.pretrained_cfg["crop_pct"]
    ((0.5, 0.5, 0.5), 1.0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import PREPROCESSOR_FILE, fitted_processor_size

__all__ = ["TrainingPreprocessing", "apply_to_timm_model", "write_processor_normalization"]


@dataclass(frozen=True)
class TrainingPreprocessing:
    """Per-channel ``mean`` / ``std`` of the training inputs, the resize ``crop_pct`` (None: unknown), the source."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float | None
    source: str

    @classmethod
    def resolve(
        cls, mean: Any, std: Any, crop_pct: float | None, processing_class: Any
    ) -> TrainingPreprocessing | None:
        """From the explicit fields, else the processor; None when neither says (the caller warns)."""
        processor_mean = getattr(processing_class, "image_mean", None)
        processor_std = getattr(processing_class, "image_std", None)
        if mean is not None or std is not None:
            if mean is None or std is None:
                raise ValueError("image_mean and image_std go together: set both (the Normalize of your transform).")
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            if len(mean) != len(std) or min(std) <= 0:
                raise ValueError(f"image_mean={list(mean)} / image_std={list(std)}: one value per channel, std > 0.")
            if processor_mean is not None and (_differs(mean, processor_mean) or _differs(std, processor_std or ())):
                raise ValueError(
                    f"image_mean/image_std {list(mean)}/{list(std)} differ from processing_class's "
                    f"{list(processor_mean)}/{list(processor_std or [])}: the saved processor would preprocess "
                    "otherwise than training. Pass the processor that matches your transform, or drop one of them."
                )
            # the values of a transform the user describes: resized straight to the input size unless said
            return cls(mean, std, 1.0 if crop_pct is None else float(crop_pct), "image_mean/image_std")
        if processor_mean is not None and processor_std is not None:
            crop = crop_pct if crop_pct is not None else _processor_crop_pct(processing_class)
            return cls(
                tuple(float(v) for v in _per_channel(processor_mean)),
                tuple(float(v) for v in _per_channel(processor_std)),
                crop,
                type(processing_class).__name__,
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct, "source": self.source}


def _per_channel(values: Any) -> list[float]:
    return [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]


def _differs(a: Any, b: Any) -> bool:
    a, b = _per_channel(a), _per_channel(b)
    return len(a) != len(b) or any(abs(x - y) > 1e-6 for x, y in zip(a, b, strict=True))


def _processor_crop_pct(processor: Any) -> float | None:
    """A transformers processor's resize-then-crop ratio (``crop_size / shortest_edge``); 1.0 for a fixed size."""
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    if isinstance(size, dict) and "shortest_edge" in size and crop.get("height"):
        return float(crop["height"]) / float(size["shortest_edge"])
    if isinstance(size, dict) and "height" in size:
        return 1.0
    return None


def apply_to_timm_model(model: nn.Module, record: TrainingPreprocessing) -> None:
    """Set a timm model's ``pretrained_cfg`` mean / std (and ``crop_pct`` when known) to the training ones."""
    config = dict(getattr(model, "pretrained_cfg", None) or {})
    config.update(mean=tuple(record.mean), std=tuple(record.std))
    if record.crop_pct is not None:
        config["crop_pct"] = float(record.crop_pct)
        config.pop("test_crop_pct", None)
    model.pretrained_cfg = config
    if hasattr(model, "default_cfg"):
        model.default_cfg = config


def write_processor_normalization(
    folder: str | Path, record: TrainingPreprocessing, input_size: list[int] | None
) -> None:
    """Make ``folder``'s ``preprocessor_config.json`` normalise as training did (a plain resize one if none)."""
    path = Path(folder) / PREPROCESSOR_FILE
    if path.is_file():
        config = json.loads(path.read_text())
    else:
        from transformers import ViTImageProcessor

        height, width = (input_size or [3, 224, 224])[-2:]
        ViTImageProcessor(size={"height": int(height), "width": int(width)}).save_pretrained(str(folder))
        config = json.loads(path.read_text())
    config.update(image_mean=list(record.mean), image_std=list(record.std), do_normalize=True)
    if record.crop_pct == 1.0 and input_size:  # resized straight to the input size
        config.update(fitted_processor_size({}, None, *input_size[-2:]))
        config.pop("crop_size", None)
        config["do_center_crop"] = False
    path.write_text(json.dumps(config, indent=2))
