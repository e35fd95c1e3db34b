"""Per-pixel saliency maps by several attribution methods, batched on the device.

- ``"gradient"``: the *loss* gradient ``|d CE(model(x), y) / d x|`` at the true label (the
  method's own saliency, what training masks by; ``input_gradients`` gives the signed gradient
  and the logits). It is not Captum's ``Saliency``, which differentiates the class logit;
- ``"logit_gradient"``: ``|d logit_y / d x|``, Captum's ``Saliency`` at the true label;
- ``"integrated_gradients"``: Captum's ``IntegratedGradients`` (zero baseline;
  ``pip install 'sd-plugin[eval]'``);
- ``"smoothgrad"``: the mean ``logit_gradient`` over noisy copies, the noise scaled by each
  image's own value range (as Captum's ``NoiseTunnel(Saliency)``, which scales by one number);
- ``"input_x_gradient"``: Captum's ``InputXGradient`` at the true label (``x * d logit_y / d x``),
  summed over channels: *signed*, positive where a pixel adds evidence for the class;
- ``"gradcam"``: Grad-CAM of the last spatial feature map (``gradcam``: found per model; ViT tokens
  reshaped to the patch grid), ReLU'd and upsampled to the input size;
- ``"native"``: the model's own explanation, ``model.explain(pixel_values, target) -> maps``, summed
  over channels when it gives ``(B, C, H, W)``; for a model converted by ``core.bcos.bcosify``, its
  contribution map ``W(x) ⊙ [x, 1 - x]`` (``core.bcos.contributions``: sums to the logit);
- ``"random"``: uniform noise (the reference order).

Every map is ``(B, H, W)``: the channel mean of the absolute attribution for the gradients,
Integrated Gradients and SmoothGrad, the signed channel sum for Input×Gradient and the native
explanation, non-negative for Grad-CAM. Ground-truth scores that count evidence (the grid pointing
game, the energy pointing game) read the positive part. Any other explanation
can be scored too: pass a function ``f(model, images, labels) -> maps`` (Captum-shaped:
``(B, C, H, W)`` attributions are reduced the same way, ``(B, H, W)`` maps are used as they are,
higher = more important). ``model`` is what Captum takes as a forward function: calling it on
``images`` gives the logits tensor (a transformers model arrives wrapped in
``model_fn.LogitsModel``, its original as ``.model``), so ``lambda m, x, y:
Occlusion(m).attribute(x, target=y, sliding_window_shapes=(3, 8, 8))`` works for every family),
or precomputed maps (``PrecomputedMaps``), wherever an ``attribution`` is taken.
``blurred(attribution, sigma)`` is the blur control of any of them.

Example:
    >>> import torch
    >>> from sd_plugin.evaluation.attribution import saliency_maps
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    >>> saliency_maps(model, torch.randn(5, 3, 4, 4), torch.zeros(5, dtype=torch.long)).shape
    torch.Size([5, 4, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import unwrap_model
from ..core.bcos import contributions, is_bcos
from ..core.masking import pixel_saliency
from .gradcam import grad_cam
from .model_fn import LogitsFn, as_logits_model, logits_fn

__all__ = [
    "ATTRIBUTIONS",
    "Attribution",
    "Explainer",
    "AttributionFn",
    "PrecomputedMaps",
    "attribution_name",
    "blur_maps",
    "blurred",
    "check_attribution",
    "input_gradients",
    "input_x_gradient",
    "native_explanation",
    "saliency_maps",
]

ATTRIBUTIONS = (
    "gradient",
    "logit_gradient",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "native",
    "random",
)
AttributionFn = Callable[..., Tensor]  # f(model, images, labels) -> (B, H, W) or (B, C, H, W)


class PrecomputedMaps:
    """Saliency maps computed elsewhere, in dataset order: ``(N, H, W)`` or ``(N, C, H, W)``.

    The evaluation reads them batch by batch in the order the images come, so pass an
    unshuffled loader over the same images (and ``max_images`` no larger than ``N``);
    ``evaluate_model(max_images=...)`` cuts maps of its whole dataset to the subset it draws.

    Example:
        >>> maps = PrecomputedMaps(torch.rand(10, 4, 4))
        >>> maps.take(8, 2, torch.device("cpu")).shape
        torch.Size([2, 4, 4])
    """

    def __init__(self, maps: Tensor, name: str = "precomputed"):
        if maps.dim() == 4:
            maps = pixel_saliency(maps)
        if maps.dim() != 3:
            raise ValueError(f"precomputed maps must be (N, H, W) or (N, C, H, W), got {tuple(maps.shape)}.")
        self.maps, self.name = maps.detach(), name

    def take(self, offset: int, count: int, device: torch.device) -> Tensor:
        if offset + count > self.maps.shape[0]:
            raise ValueError(
                f"the evaluation reached image {offset + count} but only {self.maps.shape[0]} precomputed maps "
                "were given; pass one map per evaluated image (or lower max_images)."
            )
        return self.maps[offset : offset + count].to(device)


class blurred:  # noqa: N801 - used like a function: blurred("gradient", 2.0)
    """The blur control: ``attribution``'s maps Gaussian-blurred with ``sigma`` pixels.

    Blurring adds no model information, yet improves removal scores (arXiv 2304.13836); a map
    that is "sharper and more faithful" must beat its own blurred copy.
    """

    def __init__(self, attribution: Attribution, sigma: float):
        if sigma <= 0:
            raise ValueError(f"sigma={sigma} must be > 0 pixels.")
        self.attribution, self.sigma = attribution, float(sigma)

    @property
    def name(self) -> str:
        return f"{attribution_name(self.attribution)}, blurred sigma={self.sigma:g}px"


Attribution = Union[str, AttributionFn, PrecomputedMaps, blurred]  # noqa: UP007 - a runtime alias (py3.10)


def attribution_name(attribution: Attribution) -> str:
    """A readable name for any accepted ``attribution``."""
    if isinstance(attribution, str):
        return attribution
    if isinstance(attribution, (PrecomputedMaps, blurred)):
        return attribution.name
    return getattr(attribution, "__name__", type(attribution).__name__)


def check_attribution(attribution: Attribution) -> None:
    """Raise early, naming the argument, for an attribution this package cannot use."""
    if isinstance(attribution, blurred):
        check_attribution(attribution.attribution)
    elif isinstance(attribution, str):
        if attribution not in ATTRIBUTIONS:
            raise ValueError(
                f"attribution={attribution!r} is not supported; use one of {ATTRIBUTIONS}, "
                "a function f(model, images, labels) -> maps, or PrecomputedMaps."
            )
    elif not (isinstance(attribution, PrecomputedMaps) or callable(attribution)):
        raise TypeError(f"attribution must be a name, a function or PrecomputedMaps, got {type(attribution).__name__}.")


def blur_maps(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(B, H, W)`` maps, ``sigma`` in pixels (radius ``ceil(3 sigma)``, replicated border).

    Example:
        >>> spike = torch.zeros(1, 9, 9); spike[0, 4, 4] = 1.0
        >>> blurred_spike = blur_maps(spike, 1.0)
        >>> round(float(blurred_spike.sum()), 4), bool(blurred_spike[0, 4, 4] < 1)
        (1.0, True)
    """
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype if maps.is_floating_point() else torch.float32)
    planes = maps.unsqueeze(1).to(kernel.dtype)
    padded = F.pad(planes, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def input_gradients(forward: LogitsFn, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(d CE / d x, logits)`` for a batch; one forward and one backward.

    The per-sample gradient is that of the sample's own loss (the batch loss is summed,
    so samples do not scale each other).
    """
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    if grad is None or not torch.is_tensor(grad):  # pragma: no cover - autograd returns a tensor
        raise RuntimeError("the model gives no gradient with respect to its input.")
    return grad, logits.detach()


def _captum():
    try:
        import captum.attr as attr
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "attribution='integrated_gradients'/'input_x_gradient' needs Captum: pip install 'sd-plugin[eval]'"
        ) from error
    return attr


def logit_gradients(forward: LogitsFn, images: Tensor, labels: Tensor) -> Tensor:
    """``d logit_y / d x`` for a batch (Captum's ``Saliency`` before its absolute value)."""
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logits = forward(x)
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        picked = logits.gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, x)
    return grad


def smoothgrad(
    forward: LogitsFn,
    images: Tensor,
    labels: Tensor,
    samples: int = 16,
    std: float = 0.15,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean ``|d logit_y / d x|`` over ``samples`` noisy copies, noise std ``std`` x each image's value range."""
    value_range = (images.amax((1, 2, 3), keepdim=True) - images.amin((1, 2, 3), keepdim=True)).clamp_min(1e-12)
    total = torch.zeros_like(images)
    for _ in range(samples):
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        total += logit_gradients(forward, images + noise * std * value_range, labels).abs().to(total.dtype)
    return total / samples


def input_x_gradient(forward: LogitsFn, images: Tensor, labels: Tensor) -> Tensor:
    """``(B, H, W)``: Captum's ``InputXGradient`` at ``labels``, summed over channels (signed)."""
    attr = _captum()
    with torch.enable_grad():
        values = attr.InputXGradient(forward).attribute(images.detach().clone(), target=labels)
    return values.detach().sum(1)


def native_explanation(model: nn.Module | LogitsFn, images: Tensor, labels: Tensor) -> Tensor:
    """``(B, H, W)``: the model's own explanation, ``model.explain(pixel_values, target)`` (channel sum of 4-D)."""
    base = unwrap_model(model) if isinstance(model, nn.Module) else model
    explain = getattr(base, "explain", None)
    if not callable(explain) and isinstance(base, nn.Module) and is_bcos(base):
        return contributions(base, images, labels)  # a B-cosified model: W(x) ⊙ [x, 1 - x]
    if not callable(explain):
        raise ValueError(
            f"attribution='native': {type(base).__name__} defines no explanation of its own (a method "
            "explain(pixel_values, target) -> (B, H, W) or (B, C, H, W) maps, as B-cos models have). Use another "
            f"attribution: {tuple(a for a in ATTRIBUTIONS if a != 'native')}."
        )
    with torch.enable_grad():
        maps = explain(images.detach(), labels)
    maps = maps.detach()
    return maps.sum(1) if maps.dim() == 4 else maps


class Explainer:
    """One explanation of one model, called as Captum's methods are: ``attribute(inputs, target) -> (B, H, W)``.

    ``method`` is any ``attribution`` this module takes (a name of ``ATTRIBUTIONS``, a function,
    ``blurred(...)``); ``options`` go to ``saliency_maps`` (``ig_steps``, ``smoothgrad_samples``...).
    The model is put in eval mode for the call and given its own modes back.

    Example:
        >>> import timm
        >>> explainer = Explainer(timm.create_model("resnet10t", num_classes=3), "gradcam")
        >>> explainer.attribute(torch.randn(2, 3, 64, 64), target=1).shape, explainer.name
        (torch.Size([2, 64, 64]), 'gradcam')
    """

    def __init__(self, model: nn.Module, method: Attribution = "gradient", **options: object) -> None:
        check_attribution(method)
        self.model, self.method, self.options = model, method, options

    @property
    def name(self) -> str:
        return attribution_name(self.method)

    def attribute(self, inputs: Tensor, target: int | Tensor) -> Tensor:
        from .model_fn import evaluation_mode

        labels = torch.as_tensor(target, device=inputs.device).long().expand(inputs.shape[0]).clone()
        with evaluation_mode(self.model):
            return saliency_maps(self.model, inputs, labels, self.method, **self.options)


def saliency_maps(
    model: nn.Module | LogitsFn,
    images: Tensor,
    labels: Tensor,
    attribution: Attribution = "gradient",
    generator: torch.Generator | None = None,
    ig_steps: int = 16,
    smoothgrad_samples: int = 16,
    smoothgrad_std: float = 0.15,
    offset: int = 0,
) -> Tensor:
    """``(B, H, W)`` saliency of ``images`` at ``labels`` by ``attribution``.

    Args:
        model: a classifier or a ``pixel_values -> logits`` function (eval mode expected).
        attribution: one of ``ATTRIBUTIONS``, a function ``f(model, images, labels) -> maps``,
            ``PrecomputedMaps`` or ``blurred(...)`` of any of these.
        generator: seeds the random map and SmoothGrad's noise.
        ig_steps: integration steps of Integrated Gradients (zero baseline).
        smoothgrad_samples, smoothgrad_std: SmoothGrad noise samples and their standard
            deviation relative to each image's value range.
        offset: index of the first image of ``images`` in the evaluated set (precomputed maps).
    """
    check_attribution(attribution)
    if isinstance(attribution, blurred):
        inner = saliency_maps(
            model,
            images,
            labels,
            attribution.attribution,
            generator,
            ig_steps,
            smoothgrad_samples,
            smoothgrad_std,
            offset,
        )
        return blur_maps(inner, attribution.sigma)
    if isinstance(attribution, PrecomputedMaps):
        return attribution.take(offset, images.shape[0], images.device)
    if not isinstance(attribution, str):
        with torch.enable_grad():
            values = attribution(as_logits_model(model), images.detach(), labels)
        values = values.detach()
        if values.dim() == 4:
            return pixel_saliency(values)
        if values.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"the attribution function returned shape {tuple(values.shape)}; return (B, C, H, W) attributions "
                f"or (B, H, W) maps for images of shape {tuple(images.shape)}."
            )
        return values
    if attribution == "random":
        return torch.rand(images.shape[0], *images.shape[2:], generator=generator, device=images.device)
    forward = logits_fn(model)
    if attribution == "gradient":
        grad, _ = input_gradients(forward, images, labels)
        return pixel_saliency(grad)
    if attribution == "logit_gradient":
        return pixel_saliency(logit_gradients(forward, images, labels))
    if attribution == "smoothgrad":
        return pixel_saliency(smoothgrad(forward, images, labels, smoothgrad_samples, smoothgrad_std, generator))
    if attribution == "input_x_gradient":
        return input_x_gradient(forward, images, labels)
    if attribution == "gradcam":
        if not isinstance(model, nn.Module):
            raise ValueError("attribution='gradcam' needs the model (an nn.Module), not a logits function.")
        return grad_cam(model, images, labels)
    if attribution == "native":
        return native_explanation(model, images, labels)
    attr = _captum()
    x = images.detach()
    with torch.enable_grad():
        method = attr.IntegratedGradients(forward)
        values = method.attribute(x, target=labels, n_steps=ig_steps, internal_batch_size=max(1, x.shape[0] * ig_steps))
    return pixel_saliency(values.detach())
