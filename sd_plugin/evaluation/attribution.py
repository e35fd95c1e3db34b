"""Per-pixel saliency maps by several attribution methods, batched on the device.

- ``"gradient"``: ``|d CE(model(x), y) / d x|`` (the method's own saliency; no extra deps;
  ``input_gradients`` gives the signed gradient and the logits);
- ``"integrated_gradients"``, ``"smoothgrad"``: Captum's ``IntegratedGradients`` and
  ``NoiseTunnel(Saliency)`` at the true label (``pip install 'sd-plugin[eval]'``);
- ``"random"``: uniform noise (the reference order).

Every map is the channel mean of the absolute attribution, ``(B, H, W)``.

Example:
    >>> import torch
    >>> from sd_plugin.evaluation.attribution import saliency_maps
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    >>> saliency_maps(model, torch.randn(5, 3, 4, 4), torch.zeros(5, dtype=torch.long)).shape
    torch.Size([5, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..masking import pixel_saliency
from .model_fn import LogitsFn, logits_fn

__all__ = ["ATTRIBUTIONS", "input_gradients", "saliency_maps"]

ATTRIBUTIONS = ("gradient", "integrated_gradients", "smoothgrad", "random")


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
            "attribution='integrated_gradients'/'smoothgrad' needs Captum: pip install 'sd-plugin[eval]'"
        ) from error
    return attr


def saliency_maps(
    model: nn.Module | LogitsFn,
    images: Tensor,
    labels: Tensor,
    attribution: str = "gradient",
    generator: torch.Generator | None = None,
    ig_steps: int = 16,
    smoothgrad_samples: int = 16,
    smoothgrad_std: float = 0.15,
) -> Tensor:
    """``(B, H, W)`` saliency of ``images`` at ``labels`` by ``attribution``.

    Args:
        model: a classifier or a ``pixel_values -> logits`` function (eval mode expected).
        attribution: one of ``ATTRIBUTIONS``.
        ig_steps: integration steps of Integrated Gradients (zero baseline).
        smoothgrad_samples, smoothgrad_std: SmoothGrad noise samples and their standard
            deviation relative to each image's value range.
    """
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution={attribution!r} is not supported; use one of {ATTRIBUTIONS}.")
    if attribution == "random":
        return torch.rand(images.shape[0], *images.shape[2:], generator=generator, device=images.device)
    forward = logits_fn(model)
    if attribution == "gradient":
        grad, _ = input_gradients(forward, images, labels)
        return pixel_saliency(grad)
    attr = _captum()
    x = images.detach()
    with torch.enable_grad():
        if attribution == "integrated_gradients":
            method = attr.IntegratedGradients(forward)
            values = method.attribute(
                x, target=labels, n_steps=ig_steps, internal_batch_size=max(1, x.shape[0] * ig_steps)
            )
        else:
            value_range = float((x.amax() - x.amin()).clamp_min(1e-12))
            method = attr.NoiseTunnel(attr.Saliency(forward))
            values = method.attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=smoothgrad_samples,
                nt_samples_batch_size=smoothgrad_samples,
                stdevs=smoothgrad_std * value_range,
                target=labels,
            )
    return pixel_saliency(values.detach())
