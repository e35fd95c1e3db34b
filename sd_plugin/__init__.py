"""SaliencyDecor training for the timm / Hugging Face fine-tuning stack."""

from .core.adapter import ModelAdapter, adapt
from .core.arguments import SaliencyDecorArguments
from .core.consistency import consistency_loss
from .core.decorrelation import decorrelation_loss
from .core.masking import mask_least_salient
from .core.training_step import SaliencyDecorOutput, SaliencyDecorStep
from .core.whitening import GroupZCA
from .utils.errors import NonFiniteLossError, SaliencyDecorWarning
from .utils.version import __version__ as __version__

__all__ = [
    "GroupZCA",
    "ModelAdapter",
    "NonFiniteLossError",
    "SaliencyDecorArguments",
    "SaliencyDecorConfig",
    "SaliencyDecorOutput",
    "SaliencyDecorStep",
    "SaliencyDecorTrainer",
    "SaliencyDecorWarning",
    "adapt",
    "consistency_loss",
    "decorrelation_loss",
    "mask_least_salient",
]


def __getattr__(name: str):  # lazy: the method core needs torch only
    if name == "SaliencyDecorConfig":
        from .integrations.config import SaliencyDecorConfig

        return SaliencyDecorConfig
    if name == "SaliencyDecorTrainer":
        from .integrations.trainer import SaliencyDecorTrainer

        return SaliencyDecorTrainer
    raise AttributeError(f"module 'sd_plugin' has no attribute {name!r}")
