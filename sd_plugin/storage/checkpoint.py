"""The SaliencyDecor checkpoint format: what a model folder holds beside the model's own files.

Every folder the package writes (``SaliencyDecorTrainer`` checkpoints and ``save_model``
output, exports) stores the **plain model** in its library's own format, so
``from_pretrained`` / ``timm.create_model("local-dir:...")`` / ``PeftModel.from_pretrained``
load it without sd_plugin and compute the trained model's logits:

- the whitening's buffers are not in the weight file;
- when whitened features fed the head (``whiten_head_input=True``), the head's weight and
  bias there are the folded ones (``sd_plugin.core.folding``), as ``export`` writes them.

Beside them:

- ``saliency_decor.json`` (``METADATA_FILE``): the method settings as trained, and
  ``whitening_folded_into_head``;
- ``saliency_decor_whitening.safetensors`` (``WHITENING_FILE``): what resuming training needs
  and the plain model does not, namely the whitening's running statistics (``whitening.*``)
  and, when the head was folded, its unfolded weight and bias (``unfolded_head.*``).

Example:
    >>> import torch
    >>> from sd_plugin import adapt
    >>> from sd_plugin.storage.checkpoint import split_state_dict
    >>> class Classifier(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body, self.fc = torch.nn.Linear(8, 4), torch.nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.fc(self.body(x))
    >>> model = Classifier()
    >>> adapter = adapt(model, example_inputs=torch.randn(2, 8))  # features: the input of fc
    >>> whitening = adapter.attach_whitening(group_size=2, whiten_head_input=True)
    >>> _ = model(torch.randn(16, 8))  # a training forward estimates the running statistics
    >>> split = split_state_dict(model)
    >>> sorted(split.plain), split.head_folded
    (['body.bias', 'body.weight', 'fc.bias', 'fc.weight'], True)
    >>> sorted(split.training_only)  # doctest: +NORMALIZE_WHITESPACE
    ['unfolded_head.bias', 'unfolded_head.weight', 'whitening.num_batches_tracked',
     'whitening.running_cov', 'whitening.running_mean']
    >>> x = torch.randn(5, 8)
    >>> plain_model = Classifier()
    >>> _ = plain_model.load_state_dict(split.plain)
    >>> torch.allclose(plain_model(x), model.eval()(x), atol=1e-5)  # the plain model is the trained one
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.feature_tap import is_whitening_key
from ..core.folding import find_whitening, folded_head, head_fed_by

__all__ = [
    "METADATA_FILE",
    "PREPROCESSOR_FILE",
    "copy_preprocessor_config",
    "explain_save_error",
    "fitted_processor_size",
    "SplitState",
    "WHITENING_FILE",
    "WEIGHT_FILES",
    "is_whitening_key",
    "read_metadata",
    "read_whitening_buffers",
    "restore_training_state",
    "save_training_state",
    "split_state_dict",
    "weights_fingerprint",
    "write_metadata",
]

METADATA_FILE = "saliency_decor.json"
WHITENING_FILE = "saliency_decor_whitening.safetensors"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
_WHITENING_KEY = "whitening."
_HEAD_KEY = "unfolded_head."


PREPROCESSOR_FILE = "preprocessor_config.json"


def copy_preprocessor_config(
    candidates: list[str | Path | None], folder: str | Path, input_size: list[int] | None = None
) -> bool:
    """Copy the first candidate folder's ``preprocessor_config.json`` into ``folder``; True if one was found.

    A fixed ``size`` (``height``/``width``) that is not the trained ``input_size`` is set to it, so
    the processor preprocesses as training did (e.g. the 224 px processor of a model trained at 64 px).
    """
    source = next(
        (Path(c) / PREPROCESSOR_FILE for c in candidates if c and (Path(c) / PREPROCESSOR_FILE).is_file()), None
    )
    if source is None:
        return False
    config = json.loads(source.read_text())
    if input_size:
        config.update(fitted_processor_size(config.get("size"), config.get("crop_size"), *input_size[-2:]))
    (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2))
    return True


def fitted_processor_size(size: Any, crop_size: Any, height: int, width: int) -> dict[str, Any]:
    """An image processor's ``size`` (and ``crop_size``) changed to output ``height x width`` images.

    Example:
        >>> fitted_processor_size({"height": 224, "width": 224}, None, 64, 64)
        {'size': {'height': 64, 'width': 64}}
        >>> fitted_processor_size({"shortest_edge": 256}, {"height": 224, "width": 224}, 64, 64)
        {'size': {'shortest_edge': 64}, 'crop_size': {'height': 64, 'width': 64}}
    """
    if isinstance(size, dict) and "shortest_edge" in size and crop_size:  # resize, then centre crop
        return {"size": {"shortest_edge": int(width)}, "crop_size": {"height": int(height), "width": int(width)}}
    return {"size": {"height": int(height), "width": int(width)}}


def explain_save_error(error: BaseException, folder: str | Path) -> BaseException:
    """A clear ``OSError`` (errno ENOSPC) for a save that failed on a full disk; ``error`` itself otherwise.

    torch's writer reports a full disk as ``RuntimeError: ... iostream error``, without "No space left".
    """
    import errno
    import shutil

    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    full = getattr(error, "errno", None) == errno.ENOSPC or free < 64 * 2**20
    if not full:
        return error
    return OSError(
        errno.ENOSPC,
        f"No space left on device saving {folder} ({free / 2**20:.0f} MiB free; {type(error).__name__}: {error}). "
        "Free space, keep fewer checkpoints (--checkpoints_total_limit / save_total_limit) or use another output "
        "folder; nothing half-written was kept.",
    )


def read_metadata(directory: str | Path) -> dict[str, Any] | None:
    """The ``saliency_decor.json`` of a folder, or None."""
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_metadata(directory: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``saliency_decor.json`` (values JSON cannot hold are written as strings)."""
    (Path(directory) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))


def weights_fingerprint(directory: str | Path) -> str | None:
    """SHA-256 of a model folder's weight file (safetensors, adapter or shard index), or None.

    Ties an evaluation to the weights it scored, wherever the folder is moved or copied.
    """
    for name in WEIGHT_FILES:
        path = Path(directory) / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


def _parameter_names(model: nn.Module, *parameters: torch.Tensor) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for p in parameters]


class SplitState(NamedTuple):
    """A model's state as the checkpoint format stores it (``split_state_dict``)."""

    plain: dict[str, torch.Tensor]
    training_only: dict[str, torch.Tensor]
    head_folded: bool


@torch.no_grad()
def split_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> SplitState:
    """The plain model state, the training-only state, and whether the head was folded.

    The plain state has no whitening buffers and, when the whitening feeds the head, the
    folded head; the training-only state holds the whitening buffers and the unfolded head
    (``restore_training_state`` puts them back). ``state_dict`` defaults to ``model``'s. A
    head that cannot absorb the whitening (not a ``Linear``) is left unfolded
    (``head_folded=False``): such a folder needs ``sd_plugin.storage.loading.load_classifier``.
    """
    state = dict(model.state_dict() if state_dict is None else state_dict)
    found = find_whitening(model)
    if found is None:
        return SplitState(state, {}, False)
    whitening = found[1]
    plain = {key: value for key, value in state.items() if not is_whitening_key(key)}
    training = {_WHITENING_KEY + k: v.detach().cpu().contiguous() for k, v in whitening.state_dict().items()}
    try:
        folded = folded_head(model)
    except ValueError:
        return SplitState(plain, training, False)
    if folded is None:
        return SplitState(plain, training, False)
    weight_name, bias_name = _parameter_names(model, folded.linear.weight, folded.linear.bias)
    if weight_name not in plain:  # e.g. a frozen head outside a PEFT adapter: not saved, not folded
        return SplitState(plain, training, False)
    training[_HEAD_KEY + "weight"] = folded.linear.weight.detach().cpu().contiguous()
    training[_HEAD_KEY + "bias"] = folded.linear.bias.detach().cpu().contiguous()
    plain[weight_name] = folded.weight.to(plain[weight_name].device)
    plain[bias_name] = folded.bias.to(plain[bias_name].device)
    return SplitState(plain, training, True)


def read_whitening_buffers(directory: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The whitening's buffers from a folder's ``WHITENING_FILE`` (0.1.0 folders included)."""
    from safetensors.torch import load_file

    return _whitening_buffers(load_file(str(Path(directory) / WHITENING_FILE), device=device))


def _whitening_buffers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(_WHITENING_KEY): v for k, v in tensors.items() if not k.startswith(_HEAD_KEY)}


def save_training_state(directory: str | Path, training_state: dict[str, torch.Tensor]) -> None:
    """Write ``split_state_dict(...).training_only`` (nothing when it is empty)."""
    if not training_state:
        return
    from safetensors.torch import save_file

    save_file(training_state, os.path.join(directory, WHITENING_FILE), metadata={"format": "pt"})


@torch.no_grad()
def restore_training_state(model: nn.Module, directory: str | Path) -> bool:
    """Put a folder's whitening statistics and unfolded head back into ``model``; True if it had them.

    For resuming training (or continuing to train a saved model): ``model`` has just
    loaded the folder's plain weights and carries the whitening of the same settings.
    Folders of sd_plugin 0.1.0 (whitening file without prefixes) are read too.
    """
    path = Path(directory) / WHITENING_FILE
    found = find_whitening(model)
    if found is None or not path.is_file():
        return False
    from safetensors.torch import load_file

    whitening = found[1]
    tensors = load_file(str(path), device=str(whitening.running_cov.device))
    whitening.load_state_dict(_whitening_buffers(tensors))
    if _HEAD_KEY + "weight" in tensors:
        fed = head_fed_by(model)
        if fed is None:
            raise ValueError(
                f"{path} holds an unfolded head (the model was trained with whiten_head_input=True) but the model "
                "resuming from it has no whitening on its head input; resume with the same whiten_head_input."
            )
        linear = fed[1]
        linear.weight.copy_(tensors[_HEAD_KEY + "weight"])
        linear.bias.copy_(tensors[_HEAD_KEY + "bias"])
    return True


def load_with_library_key_names(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a transformers folder into ``model`` as ``from_pretrained`` does; the parameters left unloaded.

    A plain ``load_state_dict`` of the weight file (what ``Trainer`` does when resuming) does not
    apply transformers' checkpoint key conversions: in transformers 5 a ViT checkpoint holds the
    legacy names (``vit.encoder.layer.0.attention.attention.key.weight``) of modules the model
    calls ``vit.layers.0.attention.k_proj``. ``from_pretrained`` maps them; its weights are copied
    into ``model``. Returns the model's keys (whitening buffers aside) the folder still did not
    provide; every key for a model that is not a transformers ``PreTrainedModel``.
    """
    expected = [key for key in model.state_dict() if not is_whitening_key(key)]
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return expected
    if not isinstance(model, PreTrainedModel):
        return expected
    parameter = next(model.parameters())
    loaded = type(model).from_pretrained(str(directory), config=model.config, dtype=parameter.dtype)
    weights = loaded.state_dict()
    with torch.no_grad():
        model.load_state_dict({key: weights[key] for key in expected if key in weights}, strict=False)
    return [key for key in expected if key not in weights]
