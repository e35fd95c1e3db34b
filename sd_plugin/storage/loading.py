"""Load an image classifier from a Hub id or a local folder, with its SaliencyDecor state.

Folders written by ``SaliencyDecorTrainer`` and by ``sd_plugin.hub.export`` hold the plain
model (``sd_plugin.storage.checkpoint``: whitening folded into the head when it fed the head), so
they load with plain timm / transformers too. ``load_classifier`` also reads folders whose
head could not absorb the whitening, and those of sd_plugin 0.1.0, by re-attaching the
trained whitening so the logits are the trained model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..core.families import TimmFamily, family_reading
from .checkpoint import (
    METADATA_FILE,
    WEIGHT_FILES,
    WHITENING_FILE,
    read_metadata,
    read_whitening_buffers,
    weights_fingerprint,
)
from .peft_folders import ADAPTER_CONFIG, adapter_base

__all__ = [
    "METADATA_FILE",
    "WEIGHT_FILES",
    "WHITENING_FILE",
    "weights_fingerprint",
    "load_classifier",
    "load_for_finetuning",
    "restore_whitening",
    "read_metadata",
]


def _read_config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_classifier(name_or_path: str | Path, **kwargs: Any) -> nn.Module:
    """A classifier from a local folder or a Hub id, in eval mode.

    Local folders: transformers (``config.json`` with ``model_type``), timm
    (``config.json`` with ``architecture``) or a PEFT adapter folder (``adapter_config.json``;
    its base rebuilt as ``sd_plugin.storage.peft_folders`` says, returned as the ``PeftModel``).
    Hub ids: ``timm/...`` (or ``hf-hub:...``) through timm, anything else through
    ``AutoModelForImageClassification``. ``kwargs`` go to ``from_pretrained`` / ``create_model`` (e.g. ``num_labels``).
    """
    path = Path(name_or_path)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return _load_adapter_folder(path)
    if path.is_dir():
        config = _read_config(path)
        if config is None:
            raise ValueError(
                f"{path} has no config.json: it is not a transformers or timm model folder. "
                "Pass a folder written by save_pretrained / sd_plugin.hub.export, or a Hub id."
            )
        family = family_reading(config)
        if family is None:
            raise ValueError(
                f"{path}/config.json names no model library sd-plugin reads (transformers' model_type, timm's "
                "architecture or sd_plugin.PaperCNN)."
            )
        model = family.load_folder(path, config, **kwargs)
        restore_whitening(model, path)
        return model.eval()
    name = str(name_or_path)
    if name.startswith(("./", "/", "../")):
        raise FileNotFoundError(f"model folder {name} does not exist.")
    try:
        if name.startswith("hf-hub:") or name.startswith("timm/"):
            import timm

            hub_id = name if name.startswith("hf-hub:") else f"hf-hub:{name}"
            return timm.create_model(hub_id, pretrained=True, **kwargs).eval()
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(name, **kwargs).eval()
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load model {name!r}: it is not a local folder and the Hub did not provide it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Offline, pass the path of a folder saved with save_pretrained."
        ) from error


def _load_adapter_folder(directory: Path) -> nn.Module:
    from peft import PeftModel

    base = adapter_base(directory)
    if base.folder is not None:
        model = load_classifier(base.folder)
    elif base.num_classes is not None:  # a head resized for the adapter's classes
        try:
            model = load_for_finetuning(base.name, base.num_classes, base.labels)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"the base model of the adapter folder {directory}: {error}") from error
    else:
        model = load_classifier(base.name)
    model = PeftModel.from_pretrained(model, str(directory))
    restore_whitening(model, directory)
    return model.eval()


def restore_whitening(model: nn.Module, directory: str | Path) -> bool:
    """Re-attach the trained whitening to ``model`` when it fed the head; True if attached."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    if not metadata or not metadata.get("whiten_head_input") or metadata.get("whitening_folded_into_head"):
        return False  # no whitening fed the head, or the export folded it into the head's weights
    whitening_path = directory / WHITENING_FILE
    if not whitening_path.is_file():
        raise FileNotFoundError(
            f"{directory} was trained with whitened head inputs but has no {WHITENING_FILE}; "
            "the logits cannot be reproduced without it."
        )
    from ..core.adapter import adapt

    adapter = adapt(model, feature_layer=metadata.get("feature_layer"))
    whitening = adapter.attach_whitening(
        group_size=int(metadata["group_size"]),
        whiten_head_input=True,
        shrinkage=float(metadata.get("whitening_shrinkage", 0.01)),
        method=str(metadata.get("whitening_method", "eigh")),
    )
    whitening.load_state_dict(read_whitening_buffers(directory))
    whitening.eval()
    return True


def load_for_finetuning(name_or_path: str, num_labels: int, labels: list[str] | None = None) -> nn.Module:
    """A pretrained classifier with a new ``num_labels``-way head, from a Hub id or a folder.

    timm: ``timm/...``, ``hf-hub:...``, ``local-dir:PATH`` or a folder with timm's
    ``config.json``; transformers: any other Hub id or a ``save_pretrained`` folder.
    """
    path = Path(name_or_path.removeprefix("local-dir:"))
    looks_local = name_or_path.startswith(("./", "/", "../", "local-dir:")) or path.exists()
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"--model {name_or_path}: the folder {path} does not exist.")
    config = _read_config(path) if path.is_dir() else None
    if path.is_dir() and config is None:
        raise ValueError(f"--model {name_or_path}: {path} has no config.json (not a transformers or timm model).")
    try:
        timm_folder = config is not None and isinstance(family_reading(config), TimmFamily)
        if name_or_path.startswith(("timm/", "hf-hub:")) or timm_folder:
            import timm

            source = (
                f"local-dir:{path}"
                if path.is_dir()
                else (name_or_path if name_or_path.startswith("hf-hub:") else f"hf-hub:{name_or_path}")
            )
            model = timm.create_model(source, pretrained=True, num_classes=num_labels)
            if labels:  # timm's place for class names; saved folders write them to config.json
                cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "label_descriptions"}
                model.pretrained_cfg = {**cfg, "label_names": list(labels), "num_classes": num_labels}
            return model
        from transformers import AutoModelForImageClassification

        extra: dict[str, Any] = {}
        if labels:
            extra = {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
        return AutoModelForImageClassification.from_pretrained(
            str(path) if path.is_dir() else name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True, **extra
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"--model {name_or_path!r} could not be loaded: expected a Hub id (transformers, or timm as "
            f"'timm/<name>') or a local model folder ({type(error).__name__}: {str(error).splitlines()[0]})."
        ) from error
