"""Export a trained model to a folder plain timm / transformers load, with its model card.

``export(source, path)`` takes a ``SaliencyDecorTrainer``, a model in memory, or a folder
(a ``SaliencyDecorTrainer`` output / checkpoint, including PEFT adapter folders). It
merges PEFT adapters (unless ``merge_adapter=False``), folds a whitening that fed the head
into the head's weight and bias, removes every SaliencyDecor hook and buffer, and writes
safetensors weights, the config and preprocessing config, ``saliency_decor.json`` and a
``README.md`` model card. The folder is written next to ``path`` and renamed into place
at the end, so an interrupted export never leaves a folder that looks complete.

timm keeps no record of non-default constructor arguments (``img_size``, ``embed_dim``...):
set them as ``model.sd_plugin_model_args = {...}`` before training/exporting a timm model
built with them, so its ``config.json`` rebuilds it (checkpoint folders that already have a
timm ``config.json`` with ``model_args`` pass them on).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..core.adapter import is_peft, unwrap_model
from ..core.bcos import is_bcos, save_bcos_files
from ..core.families import REPO_ID_PLACEHOLDER, ModelFamily, family_of
from ..core.folding import find_whitening, fold_whitening_into_head
from ..storage.checkpoint import (
    METADATA_FILE,
    PREPROCESSOR_FILE,
    copy_preprocessor_config,
    read_metadata,
    weights_fingerprint,
    write_metadata,
)
from ..storage.loading import load_classifier
from ..storage.peft_folders import save_adapter_base
from ..utils.errors import SaliencyDecorWarning
from .card import render_model_card

__all__ = ["ExportSource", "export", "REPO_ID_PLACEHOLDER"]


@runtime_checkable
class ExportSource(Protocol):
    """Something trained in memory that ``export`` can write (``SaliencyDecorTrainer`` is one)."""

    def export_source(self) -> tuple[nn.Module, dict[str, Any], Any]:
        """``(model, method metadata, processor or None)``."""
        ...


def _load_source(source: Any) -> tuple[nn.Module, dict[str, Any], Any, Path | None]:
    """``(model, metadata, processor, source_dir)`` from a trainer, a model or a folder."""
    if isinstance(source, ExportSource):  # e.g. a SaliencyDecorTrainer
        model, metadata, processor = source.export_source()
        return model, metadata, processor, None
    if isinstance(source, nn.Module):
        found = find_whitening(source)
        metadata: dict[str, Any] = {}
        if found is not None:
            whitening = found[1]
            metadata = {"whiten_head_input": whitening.feeds_head, "group_size": whitening.group_size}
        return source, metadata, None, None
    directory = Path(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder, a model or a SaliencyDecorTrainer.")
    metadata = read_metadata(directory) or {}
    model = load_classifier(directory)  # a PEFT adapter folder loads as its PeftModel
    return model, metadata, None, directory


def _prepare_target(path: Path, overwrite: bool) -> None:
    """Refuse to write over a file, a non-empty folder (unless ``overwrite``), or a folder that is not an export."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder.")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    if "exported_library" not in (read_metadata(path) or {}):  # only an earlier export, never a user's folder
        names = sorted(p.name for p in path.iterdir())
        raise FileExistsError(
            f"{path} is not an earlier export (its {METADATA_FILE} does not say so) and holds {names[:5]}"
            f"{' ...' if len(names) > 5 else ''}: --overwrite would delete them. Choose another folder, or empty it."
        )


def _readable_by_others(folder: Path) -> None:
    """``mkdtemp`` makes the staging folder 0700: give it the permissions a new folder gets (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        directory.chmod(0o777 & ~umask)


def _write_weights(
    model: nn.Module, family: ModelFamily, folder: Path, source_dir: Path | None, input_size: list[int] | None
) -> dict[str, Any]:
    """Write the weights (and config) as ``family`` saves them; returns metadata to add (a PEFT adapter's base)."""
    if is_peft(model):
        model.save_pretrained(str(folder), safe_serialization=True)
        return {"peft_base": save_adapter_base(model, folder)}
    model_args = getattr(model, "sd_plugin_model_args", None)
    if model_args is None and source_dir is not None and (source_dir / "config.json").is_file():
        model_args = json.loads((source_dir / "config.json").read_text()).get("model_args")
    family.save(model, folder, input_size=input_size, model_args=model_args)
    if is_bcos(model):  # bcos.json + bcos.py: loads with torch + timm (bcos.load_timm_folder) or sd_plugin
        save_bcos_files(model, str(folder))
    return {}


def bcos_usage(library: str) -> str:
    """The card's code for a B-cos folder: how to load it, and its explanation (the contribution map)."""
    if library == "timm":
        load = (
            "import sys, torch\n"
            'sys.path.insert(0, "PATH")  # the downloaded folder (huggingface_hub.snapshot_download)\n'
            "import bcos  # bcos.py beside the weights: needs torch, timm and safetensors only\n"
            'model = bcos.load_timm_folder("PATH")\n'
        )
    else:
        load = (
            "import sys, torch\n"
            'sys.path.insert(0, "PATH")\n'
            "import bcos\n"
            "from sd_plugin.storage.loading import load_classifier  # B-cosifies the architecture, then loads\n"
            'model = load_classifier("PATH")\n'
        )
    return (
        load + "logits = model(pixel_values)  # pixel_values: normalised as in training (preprocessing above)\n"
        "# the model's own explanation: W(x) ⊙ [x, 1 - x] summed over channels, (N, H, W); it sums to the logit\n"
        "maps = bcos.contributions(model, pixel_values, logits.argmax(-1))"
    )


def _save_processor(
    processor: Any, candidates: list[Path | None], folder: Path, family: ModelFamily, input_size: list[int] | None
) -> bool:
    """Write the preprocessing config: the processor, else the first candidate folder's; True if written.

    A transformers model with none gets a warning (its card then says to preprocess as in training).
    """
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(folder))
        return (folder / PREPROCESSOR_FILE).is_file()
    if copy_preprocessor_config(candidates, folder, input_size):
        return True
    if family.has_image_processor:
        warnings.warn(
            "export: no image processor to save (the trainer had no processing_class and no source folder holds a "
            "preprocessor_config.json), so the folder does not say how to preprocess images. Pass "
            "processing_class= to SaliencyDecorTrainer, or a folder that has one: `python -m sd_plugin export ... "
            "--preprocessing-from <folder>` (Python: export(..., preprocessing_from=<folder>)).",
            SaliencyDecorWarning,
            stacklevel=3,
        )
    return False


def _read_evaluation(evaluation: Any) -> tuple[dict | None, dict[str, dict], list[Path], str | None, str | None]:
    """``(metrics, comparisons, figure paths, dataset, command)`` from an evaluate results.json or dict."""
    if evaluation is None:
        return None, {}, [], None, None
    if isinstance(evaluation, (str, Path)):
        path = Path(evaluation)
        results = json.loads(path.read_text())
        figures = [Path(p) if Path(p).is_absolute() else path.parent / Path(p).name for p in results.get("figures", [])]
    else:
        results, figures = dict(evaluation), []
    if "models" in results:
        models = list(results["models"].items())
        metrics = models[0][1]
        comparisons = {name: values for name, values in models[1:]}
        return metrics, comparisons, figures, results.get("dataset"), results.get("command")
    return results, {}, figures, None, None


def _check_evaluation_is_of(metrics: dict | None, source_dir: Path | None, evaluation: Any) -> None:
    """Refuse results that ``evaluate`` computed for other weights than the folder being exported.

    Checked where both sides are known: the first model of an ``evaluate`` results.json records the
    SHA-256 of the weights it scored (``weights_sha256``), a trainer output folder has its own.
    """
    if metrics is None or source_dir is None or not metrics.get("weights_sha256"):
        return
    here = weights_fingerprint(source_dir)
    if here is not None and here != metrics["weights_sha256"]:
        raise ValueError(
            f"--evaluation {evaluation}: its first model ({metrics.get('source')}) has other weights than "
            f"{source_dir}; run `python -m sd_plugin evaluate --model {source_dir} ...` and pass that results.json."
        )


def export(
    source: Any,
    path: str | Path,
    *,
    overwrite: bool = False,
    merge_adapter: bool = True,
    evaluation: Any = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    training_command: str | None = None,
    metadata: dict[str, Any] | None = None,
    preprocessing_from: str | Path | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write an exportable checkpoint folder with its model card; returns the folder.

    Args:
        source: a ``SaliencyDecorTrainer`` (any ``ExportSource``), a model, or a folder written by the trainer.
        path: the folder to create (refused if it exists and is not empty, unless ``overwrite``).
        merge_adapter: merge PEFT adapters into the base weights (default) or save the adapter.
        evaluation: a ``results.json`` of ``python -m sd_plugin evaluate`` (first model = this one,
            the others are shown as comparisons; its figures are copied) or a dict of metrics.
        datasets, base_model, model_name, training_command: model card metadata.
        metadata: method settings to record (default: those the source carries).
        preprocessing_from: a folder whose ``preprocessor_config.json`` goes with the model when the
            source carries none (e.g. the pretrained model a recipe started from).
        license: the card's license (a Hub license id, e.g. ``apache-2.0``; default ``other``).
        language, tags: the card's ``language`` and extra ``tags`` metadata.
    """
    path = Path(path)
    _prepare_target(path, overwrite)
    model, source_metadata, processor, source_dir = _load_source(source)
    metadata = {**source_metadata, **(metadata or {})}
    exported = copy.deepcopy(model).cpu().eval()
    if is_peft(exported) and merge_adapter:
        exported = exported.merge_and_unload()
    # A trainer folder already holds the folded head (sd_plugin.storage.checkpoint): say so again.
    folded = fold_whitening_into_head(exported) or bool(metadata.get("whitening_folded_into_head"))
    base = unwrap_model(exported)
    family = family_of(base)
    metrics, comparisons, figure_paths, dataset_name, eval_command = _read_evaluation(evaluation)
    _check_evaluation_is_of(metrics, source_dir, evaluation)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        metadata = {**metadata, **_write_weights(exported, family, staging, source_dir, metadata.get("input_size"))}
        name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None)
        candidates = [
            source_dir,
            Path(preprocessing_from) if preprocessing_from else None,
            Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None,  # the model it started from
        ]
        has_processor = _save_processor(processor, candidates, staging, family, metadata.get("input_size"))
        figures = []
        for figure in figure_paths:
            if figure.is_file():
                (staging / "figures").mkdir(exist_ok=True)
                shutil.copy2(figure, staging / "figures" / figure.name)
                figures.append(f"figures/{figure.name}")
        card_metadata = {**metadata, "whitening_folded_into_head": folded, "exported_library": family.name}
        write_metadata(staging, card_metadata)
        base_model = base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or None
        if base_model and Path(str(base_model)).exists():
            base_model = None  # a local path is not a Hub id
        card = render_model_card(
            model_name=model_name or path.name,
            library_name=family.hub_library,
            metadata=metadata,
            evaluation=metrics,
            comparisons=comparisons,
            datasets=datasets or ([dataset_name] if dataset_name else None),
            base_model=base_model,
            figures=figures,
            usage=bcos_usage(family.name) if is_bcos(base) else family.usage(type(base).__name__, has_processor),
            training_command=training_command,
            evaluation_command=eval_command,
            dataset_name=dataset_name,
            license=license,
            language=language,
            tags=tags,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        _readable_by_others(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
