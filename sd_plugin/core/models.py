"""The paper's small CNNs (MNIST-style 28x28 and CIFAR-style 32x32).

Two conv blocks (conv 5x5, ReLU, 2x2 max-pool), the flattened maps as penultimate features,
and a linear head ``fc``. ``forward(pixel_values, labels=None)`` returns ``{"logits"}``
(plus ``"loss"`` given labels), so a plain ``transformers.Trainer`` can train it too.

Its folders (export, recipes) hold ``model.safetensors`` and a ``config.json`` with
``architecture: "sd_plugin.PaperCNN"`` and the constructor arguments, which
``sd_plugin.storage.loading.load_classifier`` (and ``python -m sd_plugin evaluate``) read.

Example:
    >>> import torch
    >>> model = PaperCNN.mnist()
    >>> model.num_features, tuple(model(torch.zeros(2, 1, 28, 28))["logits"].shape)
    (392, (2, 10))
    >>> PaperCNN.from_config(model.config_dict()).config_dict() == model.config_dict()
    True
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PaperCNN"]


class PaperCNN(nn.Module):
    """Two conv blocks and a linear head; ``num_features = widths[-1] * (image_size // 4) ** 2``."""

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        widths: tuple[int, int] = (16, 8),
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}.")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.image_size = image_size
        self.widths = tuple(widths)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.num_features = widths[1] * (image_size // 4) ** 2
        self.fc = nn.Linear(self.num_features, num_classes)

    @classmethod
    def mnist(cls, num_classes: int = 10) -> PaperCNN:
        """1x28x28 input, 392 features (8 maps of 7x7), as the paper's MNIST CNN."""
        return cls(1, num_classes, 28, (16, 8))

    @classmethod
    def cifar(cls, num_classes: int = 10) -> PaperCNN:
        """3x32x32 input, 512 features (8 maps of 8x8), as the paper's CIFAR-10 CNN."""
        return cls(3, num_classes, 32, (32, 8))

    ARCHITECTURE = "sd_plugin.PaperCNN"

    def config_dict(self) -> dict:
        """What ``config.json`` records: the architecture name and the constructor arguments."""
        model_args = {
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "widths": list(self.widths),
        }
        return {"architecture": self.ARCHITECTURE, "model_args": model_args}

    @classmethod
    def from_config(cls, config: dict) -> PaperCNN:
        """The (untrained) model a ``config_dict`` describes."""
        if config.get("architecture") != cls.ARCHITECTURE:
            raise ValueError(f"config architecture {config.get('architecture')!r} is not {cls.ARCHITECTURE!r}.")
        model_args = dict(config.get("model_args") or {})
        if "widths" in model_args:
            model_args["widths"] = tuple(model_args["widths"])
        return cls(**model_args)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.fc(self.features(pixel_values))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = F.cross_entropy(logits, labels)
        return output
