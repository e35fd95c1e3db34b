"""PEFT adapter folders that rebuild the trained model: which base they need, saved when it must be.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) holds the adapter
and the ``modules_to_save``; PEFT rebuilds the model on the base that
``base_model_name_or_path`` names. Three common fine-tunes defeat that, and every adapter
folder the package writes handles them:

- **a head resized for the new classes** (10 → 3, ``modules_to_save=["classifier"]``): the
  named base has the old head size, so the base is rebuilt with the adapter's class count
  (``peft_base.num_classes`` in ``saliency_decor.json``, else the saved head's rows);
- **a base built in code** (``timm.create_model("resnet10t")``): nothing names it;
- **BatchNorm running statistics** that training updated: the adapter does not hold them.

In the last two cases the base itself (frozen weights, current buffers, no adapter, no
SaliencyDecor state) is saved to ``base_model/`` inside the folder, in its library's own
format, so ``PeftModel.from_pretrained(<load base_model/>, folder)`` rebuilds the trained
model with plain timm / transformers / PEFT.

Example:
    >>> import tempfile, timm, torch
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(timm.create_model("resnet10t", num_classes=3),
    ...                        LoraConfig(r=2, target_modules=["layer1.0.conv1"], modules_to_save=["fc"]))
    >>> base_needs_saving(model)
    'nothing names the base model (built in code)'
    >>> folder = tempfile.mkdtemp()
    >>> model.save_pretrained(folder)
    >>> save_adapter_base(model, folder)["saved_base"]
    True
    >>> base = timm.create_model(f"local-dir:{folder}/base_model", pretrained=True)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from ..core.families import family_of
from .checkpoint import is_whitening_key, read_metadata

__all__ = ["BASE_FOLDER", "AdapterBase", "adapter_base", "base_needs_saving", "save_adapter_base"]

BASE_FOLDER = "base_model"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_KEY_PARTS = (".lora_", ".modules_to_save.")  # PEFT's own parameters, not the base's


class AdapterBase(NamedTuple):
    """Where an adapter folder's base comes from: ``folder`` (saved) or ``name`` (+ its class count)."""

    folder: Path | None
    name: str | None
    num_classes: int | None
    labels: list[str] | None


def _base_name(model: nn.Module) -> str | None:
    config = model.peft_config[model.active_adapter]
    name = config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None)
    return str(name) if name else None


def _has_running_statistics(model: nn.Module) -> bool:
    return any(
        isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        for name, module in model.get_base_model().named_modules()
        if ".modules_to_save." not in f".{name}."
    )


def base_needs_saving(model: nn.Module) -> str | None:
    """Why the adapter of ``model`` (a ``PeftModel``) cannot be rebuilt from its base's name; None if it can."""
    if _base_name(model) is None:
        return "nothing names the base model (built in code)"
    if _has_running_statistics(model):
        return "training updated the base's BatchNorm running statistics, which an adapter does not hold"
    return None


def _plain_base_state(model: nn.Module) -> dict[str, Any]:
    """The base's own tensors: LoRA layers' ``base_layer`` and ``original_module`` under their plain names."""
    state = {}
    for key, value in model.get_base_model().state_dict().items():
        if is_whitening_key(key) or any(part in f".{key}" for part in _ADAPTER_KEY_PARTS):
            continue
        plain = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[plain] = value.detach().cpu().contiguous()
    return state


def save_adapter_base(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Write ``base_model/`` when the adapter needs it; returns the ``peft_base`` metadata entry.

    Call after ``model.save_pretrained(directory)``. The entry records the base's name, class
    count and label names (which rebuild a resized head) and whether ``base_model/`` was saved.
    """
    from .eval_datasets import model_class_names

    directory = Path(directory)
    base = model.get_base_model()
    num_classes, labels = model_class_names(base)
    entry: dict[str, Any] = {
        "name_or_path": _base_name(model),
        "num_classes": num_classes,
        "labels": labels,
        "saved_base": False,
    }
    reason = base_needs_saving(model)
    if reason is None:
        return entry
    folder = directory / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    state = _plain_base_state(model)
    family = family_of(base)
    try:
        if not family.reloads_by_itself:
            raise ValueError(f"a {family.name} model's folder does not name its architecture")
        family.save(base, folder, state_dict=state)
    except ValueError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise ValueError(
            f"cannot save the base of this PEFT model ({type(base).__name__}): {reason}, and only bases whose "
            f"library rebuilds them from a folder (transformers, timm) can be written ({error}). Save the merged "
            "model instead (merge_adapter=True)."
        ) from None
    (folder / "README.md").write_text(
        f"The frozen base model of the adapter one folder up ({reason}). Load it with its library, then "
        "`PeftModel.from_pretrained(base, <adapter folder>)`.\n"
    )
    entry["saved_base"] = True
    return entry


def _head_rows(directory: Path, head_name: str | None) -> int | None:
    """The class count of a saved ``modules_to_save`` head (its weight's rows), if there is one."""
    weights = directory / "adapter_model.safetensors"
    if not head_name or not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        key = f"base_model.model.{head_name}.weight"
        return handle.get_slice(key).get_shape()[0] if key in handle.keys() else None


def adapter_base(directory: str | Path) -> AdapterBase:
    """Where the base of the adapter folder ``directory`` comes from (raises when nothing says)."""
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    metadata = read_metadata(directory) or {}
    entry = metadata.get("peft_base") or {}
    if (directory / BASE_FOLDER).is_dir():
        return AdapterBase(directory / BASE_FOLDER, None, None, None)
    name = config.get("base_model_name_or_path") or entry.get("name_or_path")
    if not name:
        raise ValueError(
            f"{directory / ADAPTER_CONFIG} names no base_model_name_or_path and {directory} has no {BASE_FOLDER}/: "
            "the base model is unknown. Set it in adapter_config.json, or save the adapter with "
            "SaliencyDecorTrainer.save_model / sd_plugin.hub.export(merge_adapter=False), which write the base."
        )
    head_rows = _head_rows(directory, metadata.get("head_name"))
    num_classes = entry.get("num_classes") or metadata.get("num_classes") or head_rows
    return AdapterBase(None, str(name), num_classes, entry.get("labels"))
