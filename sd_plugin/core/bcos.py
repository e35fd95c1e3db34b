"""B-cosification: turn a pretrained CNN into a B-cos network whose explanation is exact.

A B-cos layer (Böhle, Fritz & Schiele, CVPR 2022; B-cos v2, TPAMI 2024) computes
``|cos(x, w)|^(B-1) · wᵀx`` with no bias. A network of such layers, ReLUs, max/average pooling,
additions and bias-free normalisation is a *dynamic linear* map ``y = W(x)ᵀ x``: the contribution
map ``W(x) ⊙ x`` (the dynamic weights detached) sums to the logit and is the model's own
explanation. B-cosification (Arya, Rao, Böhle & Schiele, NeurIPS 2024) converts a pretrained model
instead of training one from scratch; ``bcosify`` does it in place:

- every ``Conv2d`` and ``Linear`` becomes a B-cos layer with the pretrained weight and no bias
  (depthwise and grouped convolutions included; the cosine uses each output's own input patch);
- ``BatchNorm2d`` (timm's ``BatchNormAct2d`` too) becomes uncentred: ``γ · x / sqrt(var + eps)``,
  no mean, no β (the pretrained running variance kept);
- ``ReLU6`` becomes ``ReLU`` (its clip at 6 is a constant, not a dynamic weight);
- the first convolution reads ``[x, 1 - x]`` (pixels in [0, 1], B-cos v2's encoding) with weights
  ``w (1 - m) / s`` and ``-w m / s``, which equal the original ``w · (x - m) / s`` exactly: the model
  still takes the usual normalised ``pixel_values``;
- the classifier is applied at every location before the average pooling (``head_before_pooling``).

At ``B = 1`` the converted model computes the original network *less what the conversion removes*:
the biases (convolutions, classifier, BatchNorm β), BatchNorm's centring and ReLU6's clip
(``tests/test_bcos.py`` checks this against the original with exactly those zeroed). ``set_b``
raises ``B`` (the papers raise it to 2 while fine-tuning); ``contributions`` is the explanation.

This module imports only ``torch``: an exported B-cos folder carries a copy of it as its loader.

Example:
    >>> import timm, torch
    >>> from sd_plugin.core.bcos import bcosify, contributions, set_b
    >>> model = bcosify(timm.create_model("resnet10t", num_classes=3), b=2.0).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> maps = contributions(model, x, torch.tensor([0, 2]))
    >>> maps.shape
    torch.Size([2, 32, 32])
    >>> bool(torch.allclose(maps.sum((1, 2)), model(x)[[0, 1], [0, 2]], atol=1e-4))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BcosConv2d",
    "BcosInputEncoding",
    "BcosLinear",
    "UncentredBatchNorm2d",
    "bcos_b",
    "bcosify",
    "bcosify_for_training",
    "contributions",
    "dynamic_weights_detached",
    "global_pool_module",
    "is_bcos",
    "load_timm_folder",
    "save_bcos_files",
    "set_b",
]

BCOS_CONFIG = "bcos.json"  # beside the weights of a B-cos folder: what bcosify to apply before loading them
BCOS_LOADER = "bcos.py"  # a copy of this module: the folder loads with torch + timm alone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EPS = 1e-6


def _dynamic_scale(out: Tensor, input_norm: Tensor, weight_norm: Tensor, b: float, detach: bool) -> Tensor:
    """``|cos|^(B-1)`` with ``cos = out / (|x| |w|)`` (detached when explaining)."""
    cos = out / (input_norm * weight_norm + _EPS)
    scale = cos.abs() if b == 2 else (cos.abs() + _EPS).pow(b - 1)
    return scale.detach() if detach else scale


class BcosConv2d(nn.Conv2d):
    """``|cos(x_patch, w)|^(B-1) · (w * x)``, no bias; ``B = 1`` is the plain convolution.

    ``detach_dynamic`` (set by ``dynamic_weights_detached``) detaches the scale: the layer is then
    linear for gradients, and input × gradient gives its exact contributions.
    """

    def __init__(self, *args, b: float = 1.0, **kwargs) -> None:
        kwargs["bias"] = False
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"BcosConv2d: padding_mode={self.padding_mode!r}; only 'zeros' keeps the map bias-free.")
        self.b = float(b)
        self.detach_dynamic = False
        self.same_padding = False  # TensorFlow's "SAME" (timm's Conv2dSame): zeros padded per input size

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, b: float = 1.0, weight: Tensor | None = None) -> BcosConv2d:
        """The B-cos layer with ``conv``'s geometry and weight (or ``weight``); its bias is dropped.

        timm's ``Conv2dSame`` (TensorFlow ports such as EfficientNet-Lite0) pads in its forward; the
        layer pads the same zeros (``same_padding``)."""
        weight = conv.weight if weight is None else weight
        layer = cls(
            weight.shape[1] * conv.groups,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            b=b,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.weight.data.copy_(weight.data)
        layer.same_padding = type(conv).__name__ == "Conv2dSame"
        return layer

    def _pad_same(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            pad = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((pad // 2, pad - pad // 2))
        (top, bottom), (left, right) = pads
        return F.pad(x, (left, right, top, bottom))

    def patch_norms(self, x: Tensor) -> Tensor:
        """``(N, out_channels, H', W')``: the norm of the input patch each output sees (its group's channels)."""
        groups = self.groups
        ones = torch.ones(groups, self.in_channels // groups, *self.kernel_size, device=x.device, dtype=x.dtype)
        squares = F.conv2d(x * x, ones, None, self.stride, self.padding, self.dilation, groups)
        return squares.clamp_min(0).add(_EPS).sqrt().repeat_interleave(self.out_channels // groups, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.same_padding:
            x = self._pad_same(x)
        out = self._conv_forward(x, self.weight, None)
        if self.b == 1:
            return out
        weight_norm = self.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)
        return out * _dynamic_scale(out, self.patch_norms(x), weight_norm, self.b, self.detach_dynamic)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, B={self.b:g}"


class BcosLinear(nn.Linear):
    """``|cos(x, w)|^(B-1) · wᵀx``, no bias. On a ``(N, C, H, W)`` map (``pool_after``) it is applied at
    every location and the outputs are averaged: the classifier before the global average pooling."""

    def __init__(self, in_features: int, out_features: int, b: float = 1.0, **kwargs) -> None:
        kwargs["bias"] = False
        super().__init__(in_features, out_features, **kwargs)
        self.b = float(b)
        self.detach_dynamic = False
        self.pool_after = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, b: float = 1.0) -> BcosLinear:
        layer = cls(linear.in_features, linear.out_features, b, device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight.data.copy_(linear.weight.data)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.dim() == 4
        if spatial:
            if not self.pool_after:
                raise ValueError("BcosLinear got a (N, C, H, W) map but pool_after is False.")
            x = x.permute(0, 2, 3, 1)
        out = F.linear(x, self.weight)
        if self.b != 1:
            input_norm = x.norm(dim=-1, keepdim=True)
            out = out * _dynamic_scale(out, input_norm, self.weight.norm(dim=1), self.b, self.detach_dynamic)
        return out.mean(dim=(1, 2)) if spatial else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, B={self.b:g}, pool_after={self.pool_after}"


class UncentredBatchNorm2d(nn.BatchNorm2d):
    """``γ · x / sqrt(var + eps)``: BatchNorm without centring or β (a per-channel scale, linear at eval).

    Training batches use their own variance and update ``running_var``; ``running_mean`` is kept (and
    unused) so that the pretrained state loads. ``act``/``drop`` come from timm's ``BatchNormAct2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, **kwargs) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True, **kwargs)
        self.register_parameter("bias", None)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    @classmethod
    def from_batchnorm(cls, norm: nn.BatchNorm2d) -> UncentredBatchNorm2d:
        layer = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum)
        layer.to(device=norm.running_var.device)
        if norm.affine:
            layer.weight.data.copy_(norm.weight.data)
        layer.running_var.copy_(norm.running_var)
        layer.running_mean.copy_(norm.running_mean)
        layer.num_batches_tracked.copy_(norm.num_batches_tracked)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            var = x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), momentum)
                self.num_batches_tracked.add_(1)
        else:
            var = self.running_var
        out = x * (self.weight / (var + self.eps).sqrt()).view(1, -1, 1, 1).to(x.dtype)
        return self.act(self.drop(out))


class BcosInputEncoding(nn.Module):
    """The first convolution, reading ``[x, 1 - x]`` with ``x = pixel_values · std + mean`` in [0, 1].

    ``encoded`` holds the 6-channel input of the last forward while ``capture`` is set (the tensor the
    contributions are taken against).
    """

    def __init__(self, conv: BcosConv2d, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1))
        self.capture = False
        self.encoded: Tensor | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float], b: float) -> BcosInputEncoding:
        """``w (1 - m) / s`` on ``x`` and ``-w m / s`` on ``1 - x``: the original ``w · (x - m) / s`` at B = 1."""
        if conv.in_channels != len(mean) or len(mean) != len(std):
            raise ValueError(
                f"bcosify: the first convolution reads {conv.in_channels} channels but mean/std have "
                f"{len(mean)}/{len(std)} values; pass the model's normalisation as mean=..., std=...."
            )
        m = torch.tensor([float(v) for v in mean], device=conv.weight.device).view(1, -1, 1, 1)
        s = torch.tensor([float(v) for v in std], device=conv.weight.device).view(1, -1, 1, 1)
        w = conv.weight.data
        weight = torch.cat([w * (1 - m) / s, -w * m / s], dim=1)
        return cls(BcosConv2d.from_conv(conv, b, weight=weight), mean, std)

    def encode(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values * self.std.to(pixel_values.dtype) + self.mean.to(pixel_values.dtype)
        return torch.cat([x, 1 - x], dim=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        encoded = self.encode(pixel_values)
        if self.capture:
            self.encoded = encoded
        return self.conv(encoded)


# -- conversion ------------------------------------------------------------------------------------

_ALLOWED_LEAVES = (
    BcosConv2d,
    BcosLinear,
    UncentredBatchNorm2d,
    nn.ReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)
_ALLOWED_LEAF_NAMES = {"DropPath", "SelectAdaptivePool2d", "AdaptiveAvgMaxPool2d"}


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _head_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(name, Linear)`` of the classifier: timm's ``get_classifier()`` or transformers' ``classifier``."""
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    head = head if head is not None else getattr(model, "classifier", None) or getattr(model, "fc", None)
    if head is None:
        return None
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return (names[id(linears[-1])], linears[-1]) if linears else None


def global_pool_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)``: the global average pooling before the head (timm global_pool, transformers pooler)."""
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Identity):  # already moved after a B-cos head
            continue
        if leaf == "global_pool" and getattr(module, "pool_type", "avg") == "avg":
            return name, module
        if leaf == "pooler" and isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            return name, module
    return None


def bcosify(
    model: nn.Module,
    b: float = 1.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    head_before_pooling: bool = True,
) -> nn.Module:
    """Convert ``model`` (timm or transformers CNN) into a B-cos network in place; returns it.

    Args:
        model: a CNN of convolutions, BatchNorm, ReLU/ReLU6, pooling and a linear classifier (timm
            ResNet / EfficientNet(-Lite), transformers ResNet...). Other layers (SiLU, GELU,
            squeeze-excitation, LayerNorm, attention) are refused by name: they are not dynamic
            linear without a bias.
        b: the B of every layer (1 = the original linear maps; raise it with ``set_b``).
        mean, std: the normalisation of ``pixel_values`` (default: timm's ``pretrained_cfg``, else
            ImageNet's), to read ``[x, 1 - x]`` in pixel units.
        head_before_pooling: apply the classifier at every location, then average (B-cosification's
            order; the same function at B = 1).
    """
    if is_bcos(model):
        raise ValueError("bcosify: the model is already a B-cos network (use set_b to change B).")
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(mean if mean is not None else config.get("mean", IMAGENET_MEAN))
    std = tuple(std if std is not None else config.get("std", IMAGENET_STD))
    head = _head_linear(model)
    if head is None:
        raise ValueError("bcosify: no linear classifier found (get_classifier(), classifier or fc).")
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == len(mean)), None)
    if first is None:
        raise ValueError(f"bcosify: no convolution reads the {len(mean)} image channels.")
    for name, module in list(model.named_modules()):
        if name == first:
            _replace(model, name, BcosInputEncoding.from_conv(module, mean, std, b))
        elif isinstance(module, nn.Conv2d) and not isinstance(module, BcosConv2d):
            _replace(model, name, BcosConv2d.from_conv(module, b))
        elif isinstance(module, nn.Linear) and not isinstance(module, BcosLinear):
            _replace(model, name, BcosLinear.from_linear(module, b))
        elif isinstance(module, nn.BatchNorm2d) and not isinstance(module, UncentredBatchNorm2d):
            norm = UncentredBatchNorm2d.from_batchnorm(module)
            norm.drop = getattr(module, "drop", nn.Identity())
            act = getattr(module, "act", nn.Identity())
            norm.act = nn.ReLU() if isinstance(act, nn.ReLU6) else act
            _replace(model, name, norm)
        elif isinstance(module, nn.ReLU6):
            _replace(model, name, nn.ReLU())
    if head_before_pooling:
        _pool_after_head(model, head[0])
    _check_dynamic_linear(model)
    return model


def bcosify_for_training(
    model: nn.Module,
    b: float,
    warmup_steps: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """``bcosify`` for a training run (the Trainer's and the recipes' ``bcos_b``): starts at B = 1 when B
    is warmed up, and leaves a model that is already B-cos as it is. PEFT-wrapped models are refused."""
    if type(model).__name__.startswith("Peft"):
        raise ValueError(
            "bcos_b with a PEFT model: B-cosify the base model before wrapping it (the adapters would wrap the "
            "B-cos layers), or train without bcos_b."
        )
    if is_bcos(model):
        return model
    timm_model = getattr(model, "timm_model", None)  # transformers' TimmWrapper
    bcosify(timm_model if isinstance(timm_model, nn.Module) else model, 1.0 if warmup_steps else b, mean, std)
    return model


def _pool_after_head(model: nn.Module, head_name: str) -> None:
    pool = global_pool_module(model)
    if pool is None:
        raise ValueError(
            "bcosify: no global average pooling (timm global_pool / transformers pooler) found to move "
            "after the classifier; pass head_before_pooling=False."
        )
    _replace(model, pool[0], nn.Identity())
    head_parent = head_name.rpartition(".")[0]
    container = model.get_submodule(head_parent) if head_parent else model
    for name, module in list(container.named_children()):  # transformers: Sequential(Flatten, Linear)
        if isinstance(module, nn.Flatten):
            setattr(container, name, nn.Identity())
    model.get_submodule(head_name).pool_after = True


def _check_dynamic_linear(model: nn.Module) -> None:
    leaves = {
        type(m).__name__
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, _ALLOWED_LEAVES) and type(m).__name__ not in _ALLOWED_LEAF_NAMES
    }
    if leaves:
        raise ValueError(
            f"bcosify: {sorted(leaves)} are not dynamic linear without a bias; supported layers are "
            "convolutions, linear layers, BatchNorm, ReLU/ReLU6, max/average pooling and dropout."
        )


# -- B and the explanation -------------------------------------------------------------------------


def _bcos_layers(model: nn.Module) -> Iterator[BcosConv2d | BcosLinear]:
    return (m for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear)))


def is_bcos(model: nn.Module) -> bool:
    """Whether ``model`` holds B-cos layers (converted by ``bcosify``)."""
    return any(isinstance(m, BcosInputEncoding) for m in model.modules())


def set_b(model: nn.Module, b: float) -> None:
    """Set the B of every B-cos layer (a host-side float: no device read in the forward)."""
    if not b >= 1:
        raise ValueError(f"bcos b={b}: B must be >= 1 (1 = the original linear maps, 2 = the papers' B-cos).")
    for layer in _bcos_layers(model):
        layer.b = float(b)


def bcos_b(model: nn.Module) -> float | None:
    """The B of the model's layers (``None`` when it has none)."""
    return next((layer.b for layer in _bcos_layers(model)), None)


@contextlib.contextmanager
def dynamic_weights_detached(model: nn.Module) -> Iterator[None]:
    """Within: every B-cos scale is detached, so gradients are the dynamic weights ``W(x)``."""
    layers = list(_bcos_layers(model))
    for layer in layers:
        layer.detach_dynamic = True
    try:
        yield
    finally:
        for layer in layers:
            layer.detach_dynamic = False


def contributions(model: nn.Module, pixel_values: Tensor, target: Tensor) -> Tensor:
    """``(N, H, W)``: ``Σ_channels W(x) ⊙ [x, 1 - x]`` of the ``target`` logits, dynamic weights detached.

    The map sums to the target logit (no biases anywhere). Call in ``eval()`` mode (BatchNorm on
    its running variance, so the map is that of the model as it predicts).
    """
    encoding = next((m for m in model.modules() if isinstance(m, BcosInputEncoding)), None)
    if encoding is None:
        raise ValueError("contributions: the model is not a B-cos network; convert it with bcosify(model).")
    target = torch.as_tensor(target, device=pixel_values.device).view(-1, 1)
    encoding.capture = True
    try:
        with torch.enable_grad(), dynamic_weights_detached(model):
            output = model(pixel_values.detach().requires_grad_(True))
            logits = getattr(output, "logits", output)
            encoded = encoding.encoded
            (grad,) = torch.autograd.grad(logits.gather(1, target).sum(), encoded)
    finally:
        encoding.capture = False
        encoding.encoded = None
    return (grad * encoded).sum(1).detach()


# -- folders ---------------------------------------------------------------------------------------


def save_bcos_files(model: nn.Module, folder: str) -> None:
    """Write ``bcos.json`` (B, head order) and ``bcos.py`` (this module) beside a B-cos model's weights."""
    import json
    import shutil
    from pathlib import Path

    head_first = any(isinstance(m, BcosLinear) and m.pool_after for m in model.modules())
    config = {"b": bcos_b(model), "head_before_pooling": head_first}
    Path(folder, BCOS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(__file__, Path(folder, BCOS_LOADER))


def load_timm_folder(folder: str) -> nn.Module:
    """A B-cos timm model from its folder (``config.json``, ``bcos.json``, ``model.safetensors``), in eval mode.

    Needs only torch, timm and safetensors: ``import sys; sys.path.insert(0, folder); import bcos;
    model = bcos.load_timm_folder(folder); maps = bcos.contributions(model, pixel_values, target)``.
    """
    import json
    from pathlib import Path

    import timm
    from safetensors.torch import load_file

    config = json.loads(Path(folder, "config.json").read_text())
    settings = json.loads(Path(folder, BCOS_CONFIG).read_text())
    model_args = dict(config.get("model_args") or {})
    model_args.setdefault("num_classes", config.get("num_classes"))
    model = timm.create_model(config["architecture"], pretrained=False, **model_args)
    bcosify(model, settings["b"], head_before_pooling=settings["head_before_pooling"])
    weights = load_file(str(Path(folder, "model.safetensors")))
    model.load_state_dict({k: v for k, v in weights.items() if "saliency_decor_whitening" not in k.split(".")})
    return model.eval()
