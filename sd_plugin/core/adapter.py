"""Find the penultimate features and the classifier head of an image classifier.

``adapt(model)`` returns a ``ModelAdapter`` for transformers image classifiers (ResNet,
ViT/DeiT, ConvNeXt, Swin, TimmWrapper, ...), timm models, PEFT-wrapped ones, and any
``nn.Module`` given ``feature_layer``. The adapter knows how to call the model on
``pixel_values`` and taps the features the head reads: for CNNs the pooled features, for
ViT/DeiT the CLS token after the final norm.

Example:
    >>> import timm, torch
    >>> from sd_plugin.core.adapter import adapt
    >>> model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    >>> adapter = adapt(model)
    >>> adapter.head_name, adapter.num_features, adapter.is_transformer
    ('fc', 512, False)
    >>> logits, features = adapter.forward_with_features(model, torch.randn(2, 3, 32, 32))
    >>> tuple(features.shape)
    (2, 512)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .bcos import BcosInputEncoding
from .families import ModelFamily, family_named, family_of
from .feature_tap import WHITENING_MODULE_NAME, FeatureTap
from .whitening import GroupZCA

__all__ = [
    "ModelAdapter",
    "adapt",
    "expected_channels",
    "extract_logits",
    "is_peft",
    "library_of",
    "unwrap_model",
]

_HEAD_ATTRIBUTES = ("classifier", "head", "fc", "last_linear")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel, ``torch.compile`` and PEFT wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif is_peft(model):
            model = model.get_base_model()
        else:
            break
    return model


def is_peft(model: nn.Module) -> bool:
    """True for a PEFT wrapper (``PeftModel``)."""
    return type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model")


def library_of(model: nn.Module) -> str:
    """``"transformers"``, ``"timm"`` or ``"torch"``: the name of ``model``'s family (``sd_plugin.core.families``)."""
    return family_of(unwrap_model(model)).name


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LookupError("module not found in model")  # pragma: no cover


def _linear_out_features(head: nn.Module) -> int | None:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1].out_channels
    return None


def _find_head(base: nn.Module) -> tuple[nn.Module, str] | None:
    """The classifier head of a transformers or timm model, or None."""
    candidates: list[nn.Module] = []
    owner = base.timm_model if hasattr(base, "timm_model") else base
    if callable(getattr(owner, "get_classifier", None)):
        try:
            candidates.append(owner.get_classifier())
        except (AttributeError, TypeError):
            pass
    for attribute in _HEAD_ATTRIBUTES:
        module = getattr(owner, attribute, None)
        if isinstance(module, nn.Module):
            candidates.append(module)
    for head in candidates:
        if isinstance(head, nn.Identity):
            continue
        if _linear_out_features(head) is not None:
            return head, _module_name(base, head)
    return None


def _first_conv_in_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, BcosInputEncoding):  # a B-cos model reads the image's channels, then [x, 1 - x]
            return module.mean.shape[1]
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def _looks_like_transformer(model: nn.Module) -> bool:
    return any("attention" in type(m).__name__.lower() for m in model.modules())


@dataclass
class ModelAdapter:
    """How to call a classifier and where its penultimate features are.

    Attributes:
        model: the model as given (possibly PEFT-wrapped).
        base_model: the unwrapped model.
        head_name: name (in ``base_model``) of the tapped module.
        tap: the installed ``FeatureTap``.
        num_features: ``D``, width of the penultimate features.
        num_classes: number of logits.
        in_channels: channels the model expects, when known.
        is_transformer: attention-based model (ViT/DeiT/Swin...).
        library: ``"transformers"``, ``"timm"`` or ``"torch"``.
    """

    model: nn.Module
    base_model: nn.Module
    head_name: str
    tap: FeatureTap
    num_features: int
    num_classes: int
    in_channels: int | None
    is_transformer: bool
    library: str
    labels_checked: bool = False  # the first batch's labels were checked against num_classes

    @property
    def family(self) -> ModelFamily:
        """How models of this library are called, saved and described (``sd_plugin.core.families``)."""
        return family_named(self.library)

    @property
    def whitening(self) -> GroupZCA | None:
        """The attached ``GroupZCA`` (held by the tap), or None."""
        return self.tap.whitening

    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """Call ``model`` (this adapter's model or a wrapper of it) and return logits."""
        return extract_logits(self.family.call(model, pixel_values))

    def forward_with_features(self, model: nn.Module, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the penultimate features ``f`` (before any whitening)."""
        self.tap.clear()
        logits = self.logits(model, pixel_values)
        if self.tap.features is None:
            raise RuntimeError(f"the forward pass did not reach {self.head_name!r}; pass feature_layer= to adapt().")
        return logits, self.tap.features

    def check_batch(self, pixel_values: Any, labels: Any) -> None:
        """Raise a clear ``ValueError`` for batches the model cannot train on."""
        if labels is None:
            raise ValueError(
                "the batch has no labels: the dataset must provide a 'labels' column "
                "(or 'label', which the default collator renames)."
            )
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {shape}.")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be floating point to carry input gradients, got {pixel_values.dtype}; "
                "convert images with the model's image processor or transforms.ToTensor()."
            )
        if self.in_channels is not None and pixel_values.shape[1] != self.in_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects {self.in_channels}; "
                "convert the images (e.g. image.convert('RGB')) or build the model with that many input channels."
            )
        if labels.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {pixel_values.shape[0]} images.")
        if self.num_classes == 1:
            raise ValueError(
                "the model's head has 1 output: a classifier needs at least 2 classes (cross-entropy over one class is "
                "always 0). Build the head with num_labels/num_classes equal to the dataset's number of classes."
            )
        if not self.labels_checked and self.num_classes > 0 and labels.numel() > 0:
            # once (the first batch): reading the labels waits for the device
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"labels range over [{low}, {high}] but the model's head has {self.num_classes} outputs "
                    f"(labels 0..{self.num_classes - 1}); build the head with num_labels/num_classes equal to the "
                    "dataset's number of classes."
                )
            self.labels_checked = True

    def attach_whitening(
        self, group_size: int = 16, whiten_head_input: bool | None = None, **whitening_kwargs: Any
    ) -> GroupZCA:
        """Create a ``GroupZCA`` on the model (submodule ``saliency_decor_whitening``).

        ``whiten_head_input=None`` picks the paper's default: whitened features feed the
        head for CNNs, and only the decorrelation loss for transformers (§V-B4).
        ``method="auto"`` (default) is ZCA by ``eigh`` when the whitening feeds the head and the
        Cholesky whitening when it feeds only the loss (the same loss, cheaper, no host sync).
        """
        if whiten_head_input is None:
            whiten_head_input = not self.is_transformer
        method = whitening_kwargs.pop("method", "auto")
        if method == "auto":  # ZCA where the head reads the rotation, Cholesky where only the loss does
            method = "eigh" if whiten_head_input else "cholesky"
        if method == "cholesky" and whiten_head_input:
            raise ValueError(
                "whitening_method='cholesky' with whiten_head_input=True: the Cholesky whitening is a "
                "feature-order-dependent rotation of ZCA, fine for the loss but not for features the head "
                "reads. Use whitening_method='auto' (ZCA by eigh here) or 'eigh'."
            )
        whitening_kwargs["method"] = method
        whitening = getattr(self.base_model, WHITENING_MODULE_NAME, None)
        if not isinstance(whitening, GroupZCA):
            whitening = GroupZCA(self.num_features, group_size=group_size, **whitening_kwargs)
            reference = next(self.base_model.parameters(), None)
            if reference is not None:
                whitening = whitening.to(reference.device)
            whitening.train(self.base_model.training)
            self.base_model.add_module(WHITENING_MODULE_NAME, whitening)
        elif whitening.group_size != group_size:
            raise ValueError(
                f"the model already carries a GroupZCA with group_size={whitening.group_size}, "
                f"but group_size={group_size} was requested."
            )
        self.tap.whitening = whitening
        self.tap.whiten_head_input = whiten_head_input
        # Recorded on the module so export can fold it without the adapter.
        whitening.feeds_head = bool(whiten_head_input)
        whitening.tap_module_name = self.head_name
        whitening.tap_where = self.tap.where
        return whitening

    def remove(self) -> None:
        """Remove the hook (the whitening module stays, with its buffers)."""
        self.tap.remove()


def extract_logits(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, an output with ``.logits``, or a tuple's first tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}.")


def adapt(model: nn.Module, feature_layer: str | None = None, example_inputs: Tensor | None = None) -> ModelAdapter:
    """Build a ``ModelAdapter`` for ``model``.

    Args:
        model: a transformers image classifier, a timm model, either wrapped by PEFT,
            or any ``nn.Module`` returning logits from ``model(pixel_values)``.
        feature_layer: name (as in ``base_model.named_modules()``) of the module whose
            *output* is the ``(B, D)`` penultimate features. Needed only when the head
            cannot be found automatically.
        example_inputs: a batch ``(B, C, H, W)`` used to size the features when they
            must be measured by a forward pass (``feature_layer`` given); default: a
            zero image of the size the model's config declares.
    """
    base = unwrap_model(model)
    library = library_of(base)
    if feature_layer is not None:
        modules = dict(base.named_modules())
        if feature_layer not in modules:
            tail = [name for name in modules if name][-8:]
            raise ValueError(
                f"feature_layer={feature_layer!r} is not a module of {type(base).__name__}; "
                f"the last module names are {tail}."
            )
        module = modules[feature_layer]
        tap = FeatureTap(module, "output", feature_layer)
        head_name = feature_layer
        num_features, num_classes = _probe_sizes(model, base, tap, library, example_inputs)
    else:
        found = _find_head(base)
        if found is None:
            tail = [name for name, _ in base.named_modules() if name][-8:]
            raise ValueError(
                f"cannot find the classification head of {type(base).__name__} (looked for "
                f"get_classifier() and attributes {_HEAD_ATTRIBUTES}); if the model has no head, "
                "build it with num_labels/num_classes > 0, otherwise pass "
                f"feature_layer='<module whose output is the (B, D) penultimate features>', "
                f"e.g. one of {tail}."
            )
        head, head_name = found
        tap = FeatureTap(head, "input", head_name)
        num_classes = _linear_out_features(head) or 0
        num_features = _head_in_features(head)
        if num_features is None:
            num_features = _probe_sizes(model, base, tap, library, example_inputs)[0]
    return ModelAdapter(
        model=model,
        base_model=base,
        head_name=head_name,
        tap=tap,
        num_features=num_features,
        num_classes=num_classes,
        in_channels=expected_channels(base),
        is_transformer=_looks_like_transformer(base),
        library=library,
    )


def _head_in_features(head: nn.Module) -> int | None:
    for module in head.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    return None


def expected_channels(base: nn.Module) -> int | None:
    """The number of input channels the model expects (its config, else its first convolution), or None."""
    config = getattr(base, "config", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int):
        return channels
    return _first_conv_in_channels(base)


def _probe_input(base: nn.Module, example_inputs: Tensor | None = None) -> Tensor:
    reference = next(base.parameters(), None)
    if example_inputs is not None:
        x = example_inputs[:2]
        if reference is not None:
            x = x.to(reference.device, reference.dtype if reference.is_floating_point() else x.dtype)
        return x
    channels = expected_channels(base) or 3
    size = 224
    config = getattr(base, "config", None)
    if isinstance(getattr(config, "image_size", None), int):
        size = config.image_size
    pretrained_cfg = getattr(base, "pretrained_cfg", None) or {}
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        size = pretrained_cfg["input_size"][-1]
    device = reference.device if reference is not None else "cpu"
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return torch.zeros(2, channels, size, size, device=device, dtype=dtype)


@torch.no_grad()
def _probe_sizes(
    model: nn.Module, base: nn.Module, tap: FeatureTap, library: str, example_inputs: Tensor | None
) -> tuple[int, int]:
    """``(num_features, num_classes)`` from one eval-mode forward of a probe batch."""
    was_training = base.training
    base.eval()
    try:
        tap.clear()
        x = _probe_input(base, example_inputs)
        output = family_named(library).call(model, x)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"could not run a probe forward to size the features at {tap.module_name!r}: {error}. "
            "Pass example_inputs= (a batch of real images) to adapt(); SaliencyDecorTrainer and the recipes take "
            "them from the first training example, so give the training set items whose 'pixel_values' is a float "
            "(C, H, W) tensor the model accepts (a dataset transform, e.g. with_transform), or check feature_layer."
        ) from error
    finally:
        base.train(was_training)
    if tap.features is None:
        raise ValueError(f"the forward pass never reached {tap.module_name!r}; check feature_layer.")
    features = int(tap.features.shape[1])
    tap.clear()
    return features, int(extract_logits(output).shape[-1])
