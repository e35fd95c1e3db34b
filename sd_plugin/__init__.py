"""SaliencyDecor training for the timm / Hugging Face fine-tuning stack."""

from .adapter import ModelAdapter, adapt
from .arguments import SaliencyDecorArguments
from .consistency import consistency_loss
from .decorrelation import decorrelation_loss
from .errors import NonFiniteLossError, SaliencyDecorWarning
from .masking import mask_least_salient
from .training_step import SaliencyDecorOutput, SaliencyDecorStep
from .version import __version__ as __version__
from .whitening import GroupZCA

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
        from .config import SaliencyDecorConfig

        return SaliencyDecorConfig
    if name == "SaliencyDecorTrainer":
        from .trainer import SaliencyDecorTrainer

        return SaliencyDecorTrainer
    raise AttributeError(f"module 'sd_plugin' has no attribute {name!r}")
