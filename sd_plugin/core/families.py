"""Model families: what differs between transformers, timm and plain PyTorch classifiers, in one place.

A family says how a model of its library is called (``pixel_values=`` or positional), how a
folder of it is written so that its own library reloads it (transformers' ``save_pretrained``,
timm's ``config.json`` + safetensors, plain safetensors), which folders it reads back
(``sd_plugin.storage.loading``), which ``library_name`` its model card has and how the card shows it
being loaded. The adapter, the checkpoint format, ``export``, the card, the loaders and the
Trainer ask ``family_of(model)`` / ``family_named(library)`` / ``family_reading(config)``
instead of branching on the library. A new family is a subclass here, listed in ``FAMILIES``
before the plain one, plus a tiny test model (ARCHITECTURE.md, "where a change goes").

Example:
    >>> import timm
    >>> family = family_of(timm.create_model("resnet10t", pretrained=False, num_classes=3))
    >>> family.name, family.hub_library
    ('timm', 'timm')
    >>> family_of(torch.nn.Linear(2, 2)).name
    'torch'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bcos import BCOS_CONFIG, bcosify

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "TimmFamily",
    "TransformersFamily",
    "family_named",
    "family_of",
    "family_reading",
    "timm_label_names",
    "trained_pretrained_cfg",
    "write_timm_config",
]

_HUB_CFG_KEYS = ("url", "hf_hub_id", "file")  # where the *pretrained* weights were; not these
REPO_ID_PLACEHOLDER = "<repo_id>"  # the card's usage code names the repository; push replaces it


class ModelFamily:
    """A plain PyTorch classifier (``model(pixel_values)`` returns logits): the family every model has.

    Subclasses override what their library does differently.
    """

    name = "torch"
    hub_library = "pytorch"  # the model card's ``library_name``
    reloads_by_itself = False  # a saved folder names its architecture, so its library rebuilds it
    has_image_processor = False  # its library saves a ``preprocessor_config.json`` beside the weights

    def matches(self, model: nn.Module) -> bool:
        return True

    def call(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        """The model's output for a batch (the adapter extracts the logits)."""
        return model(pixel_values)

    def save(
        self,
        model: nn.Module,
        folder: Path,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        input_size: list[int] | None = None,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        """Write the weights (``state_dict``, default the model's) and the config its library reloads."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        self.write_config(model, folder, input_size=input_size)

    def write_config(self, model: nn.Module, folder: str | Path, *, input_size: list[int] | None = None) -> None:
        """The config beside weights its library (or the Trainer) wrote: ``sd_plugin.PaperCNN``'s, else none."""
        if hasattr(model, "config_dict"):  # sd_plugin.PaperCNN: load_classifier rebuilds it from this
            (Path(folder) / "config.json").write_text(json.dumps(model.config_dict(), indent=2))

    def reads_folder(self, config: dict[str, Any]) -> bool:
        """Whether a folder with this ``config.json`` holds a model of this family: ``sd_plugin.PaperCNN``'s."""
        return config.get("architecture") == "sd_plugin.PaperCNN"

    def load_folder(self, folder: Path, config: dict[str, Any], **kwargs: Any) -> nn.Module:
        """The model of a folder ``reads_folder`` accepted (the whitening's buffers are not its weights)."""
        from .models import PaperCNN

        model = PaperCNN.from_config(config)
        model.load_state_dict(_model_weights(folder), strict=True)
        return model

    def usage(self, model_class: str, has_processor: bool = True) -> str:
        """The model card's "how to load it" code."""
        if model_class == "PaperCNN":
            return (
                "from sd_plugin.storage.loading import load_classifier  # pip install sd-plugin\n"
                'model = load_classifier("PATH")  # this folder: PaperCNN(**config.json model_args) + model.safetensors'
            )
        return (
            "from safetensors.torch import load_file\n"
            f"model = {model_class}(...)  # the architecture it was trained with (import it from your code)\n"
            'model.load_state_dict(load_file("model.safetensors"))'
        )


class TransformersFamily(ModelFamily):
    """A transformers ``PreTrainedModel``: called with ``pixel_values=``, saved with ``save_pretrained``."""

    name = "transformers"
    hub_library = "transformers"
    reloads_by_itself = True
    has_image_processor = True

    def matches(self, model: nn.Module) -> bool:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            return False
        return isinstance(model, PreTrainedModel)

    def call(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        return model(pixel_values=pixel_values)

    def save(self, model, folder, *, state_dict=None, input_size=None, model_args=None) -> None:
        model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)

    def write_config(self, model, folder, *, input_size=None) -> None:
        """Nothing: ``save_pretrained`` wrote ``config.json``."""

    def reads_folder(self, config: dict[str, Any]) -> bool:
        return "model_type" in config

    def load_folder(self, folder: Path, config: dict[str, Any], **kwargs: Any) -> nn.Module:
        from transformers import AutoConfig, AutoModelForImageClassification

        if not (Path(folder) / BCOS_CONFIG).is_file():
            return AutoModelForImageClassification.from_pretrained(str(folder), **kwargs)
        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(str(folder), **kwargs))
        _bcosify_as_saved(model, folder)  # a B-cos model: the architecture converted, then its weights
        model.load_state_dict(_model_weights(folder), strict=True)
        return model

    def usage(self, model_class: str, has_processor: bool = True) -> str:
        load = f'model = AutoModelForImageClassification.from_pretrained("{REPO_ID_PLACEHOLDER}")  # or a local path\n'
        if not has_processor:
            return (
                "from transformers import AutoModelForImageClassification\n"
                f"{load}model.eval()\n"
                "# no preprocessor_config.json was saved: preprocess images as in training"
            )
        return (
            "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
            f"{load}"
            f'processor = AutoImageProcessor.from_pretrained("{REPO_ID_PLACEHOLDER}")\n'
            "model.eval()\n"
            'logits = model(**processor(image, return_tensors="pt")).logits  # image: a PIL image'
        )


class TimmFamily(ModelFamily):
    """A timm model: ``config.json`` with its ``pretrained_cfg`` (trained input size, class names) + safetensors."""

    name = "timm"
    hub_library = "timm"
    reloads_by_itself = True

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    def save(self, model, folder, *, state_dict=None, input_size=None, model_args=None) -> None:
        if state_dict is not None:  # given weights (a PEFT base): timm's config, then the weights
            if not write_timm_config(model, folder, input_size=input_size):
                raise ValueError(f"the timm model {type(model).__name__} has no pretrained_cfg architecture to save.")
            super().save(model, folder, state_dict=state_dict)
            return
        from timm.models._hub import save_for_hf

        labels = timm_label_names(model)
        save_for_hf(
            model,
            str(folder),
            model_config={"label_names": labels} if labels else None,
            model_args=model_args or getattr(model, "sd_plugin_model_args", None),
            safe_serialization=True,
            data_config={"input_size": tuple(input_size)} if input_size else None,  # the size it was trained at
        )

    def write_config(self, model, folder, *, input_size=None) -> None:
        write_timm_config(model, folder, input_size=input_size)

    def reads_folder(self, config: dict[str, Any]) -> bool:
        architecture = str(config.get("architecture", ""))
        return bool(architecture) and "model_type" not in config and not architecture.startswith("sd_plugin.")

    def load_folder(self, folder: Path, config: dict[str, Any], **kwargs: Any) -> nn.Module:
        """``timm.create_model`` of the recorded architecture and arguments, its weights and ``pretrained_cfg``."""
        import timm

        model_args = dict(config.get("model_args") or {})
        model_args.setdefault("num_classes", config.get("num_classes"))
        model = timm.create_model(config["architecture"], pretrained=False, **model_args)
        _bcosify_as_saved(model, folder)
        model.load_state_dict(_model_weights(folder), strict=True)
        pretrained_cfg = config.get("pretrained_cfg")
        if isinstance(pretrained_cfg, dict):
            model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pretrained_cfg}
        if config.get("label_names"):  # timm keeps the class names at the top of its config.json
            model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(config["label_names"])}
        return model

    def usage(self, model_class: str, has_processor: bool = True) -> str:
        return (
            "import timm\n"
            f'model = timm.create_model("hf-hub:{REPO_ID_PLACEHOLDER}", pretrained=True)  # or "local-dir:PATH"\n'
            "model.eval()\n"
            "config = timm.data.resolve_data_config(model=model)\n"
            "transform = timm.data.create_transform(**config)"
        )


# In the order they are tried; the plain family matches every model, so it comes last.
FAMILIES: tuple[ModelFamily, ...] = (TransformersFamily(), TimmFamily(), ModelFamily())


def family_of(model: nn.Module) -> ModelFamily:
    """The family of ``model`` (an unwrapped base model: no DDP, ``torch.compile`` or PEFT wrapper)."""
    return next(family for family in FAMILIES if family.matches(model))


def family_reading(config: dict[str, Any]) -> ModelFamily | None:
    """The family whose folders have this ``config.json``, or None."""
    return next((family for family in FAMILIES if family.reads_folder(config)), None)


def _bcosify_as_saved(model: nn.Module, folder: Path) -> None:
    """Apply the ``bcosify`` a B-cos folder records (``bcos.json``) before its weights load; else nothing."""
    path = Path(folder) / BCOS_CONFIG
    if path.is_file():
        settings = json.loads(path.read_text())
        bcosify(model, settings["b"], head_before_pooling=settings["head_before_pooling"])


def _model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` without the whitening's buffers (restored separately, ``sd_plugin.storage.loading``)."""
    from safetensors.torch import load_file

    from .feature_tap import is_whitening_key

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors.")
    return {k: v for k, v in load_file(str(path)).items() if not is_whitening_key(k)}


def family_named(name: str) -> ModelFamily:
    """The family whose ``name`` is ``name`` (as recorded in ``saliency_decor.json``'s ``library``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    return FAMILIES[-1]


def timm_label_names(model: nn.Module) -> list[str] | None:
    """The class names a timm model carries (``pretrained_cfg["label_names"]``), if one per output."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if not names or len(names) != getattr(model, "num_classes", None):
        return None
    return [str(name) for name in (names.values() if isinstance(names, dict) else names)]


def trained_pretrained_cfg(model: nn.Module, input_size: list[int] | tuple[int, ...] | None) -> dict[str, Any]:
    """A timm model's ``pretrained_cfg`` with ``input_size`` the size it was trained at (so timm's data config,
    and ``evaluate``, preprocess at that size; ``test_input_size`` is dropped when it differs)."""
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if input_size and tuple(pretrained_cfg.get("input_size") or ()) != tuple(input_size):
        pretrained_cfg["input_size"] = tuple(input_size)
        pretrained_cfg.pop("test_input_size", None)
    return pretrained_cfg


def write_timm_config(
    model: nn.Module, directory: str | Path, *, input_size: list[int] | None = None, **extra: Any
) -> bool:
    """timm's ``config.json`` (architecture, classes, ``pretrained_cfg``) so ``local-dir:`` reloads it.

    ``input_size``: the ``(C, H, W)`` it was trained at, recorded in ``pretrained_cfg``.
    ``extra`` adds keys (``label_names``, ``global_pool``...); ``model.sd_plugin_model_args``
    (constructor arguments timm does not record) becomes ``model_args``. False (nothing
    written) when the model has no ``pretrained_cfg["architecture"]``.
    """
    pretrained_cfg = trained_pretrained_cfg(model, input_size)
    architecture = pretrained_cfg.get("architecture")
    if not architecture:
        return False
    labels = timm_label_names(model)
    config = {
        "architecture": architecture,
        "num_classes": getattr(model, "num_classes", None),
        "num_features": getattr(model, "num_features", None),
        **({"label_names": labels} if labels else {}),
        **extra,
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if k not in _HUB_CFG_KEYS and _json_safe(v)},
    }
    model_args = getattr(model, "sd_plugin_model_args", None)
    if model_args:
        config["model_args"] = model_args
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2))
    return True


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
