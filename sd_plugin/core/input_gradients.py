"""Training terms that act on the input gradient itself: adversarial inputs, gradient norm, RRR.

Three families of methods that the literature reports to make gradient saliency point at the
evidence (see RESULTS.md for how they score here):

- ``adversarial_perturbation``: projected gradient ascent (PGD) on the cross-entropy within an
  ``l_inf`` or ``l_2`` ball of radius ``epsilon`` (Madry et al. 2018; ``steps=1`` with a random
  start is "fast" adversarial training, Wong et al. 2020). As the ``robustness`` library does, the
  attack runs with the model in ``eval()`` mode (BatchNorm uses and does not update its running
  statistics) and leaves the parameters' ``.grad`` untouched; training then runs on ``x + delta``
  in the model's own mode. Pixel values are not clamped: the package sees normalised inputs whose
  valid range it does not know.
- ``input_gradient_penalty``: ``mean_i ||d CE_i / d x_i||^2`` by double back-propagation (Drucker &
  LeCun 1992; Ross & Doshi-Velez 2018), and ``finite_difference_gradient_penalty``: the same
  quantity as ``((CE_i(x_i + h d_i) - CE_i(x_i)) / h)^2`` along the detached unit gradient
  direction ``d_i``, which needs first-order gradients only (one more forward and backward;
  Finlay & Oberman 2021).
- ``explanation_penalty``: "Right for the right reasons" (Ross, Hughes & Doshi-Velez 2017):
  ``mean_i sum_{outside the object} (d sum_k log p_k / d x)^2``, the input gradient of the summed
  log-probabilities penalised outside each image's annotated object mask.

The two double-backpropagation terms build their model forward inside
``twice_differentiable_attention`` (attention by the math backend: the fused kernels have no
second derivative), so they train transformers ViT / DeiT / Swin and timm ViTs as CNNs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    >>> logits_of = lambda images: model(images)
    >>> delta = adversarial_perturbation(logits_of, x, y, epsilon=0.1, norm="linf", steps=1, random_start=False)
    >>> round(float(delta.abs().max()), 6)  # one signed step of size epsilon
    0.1
    >>> inputs = x.clone().requires_grad_(True)
    >>> penalty = input_gradient_penalty(nn.functional.cross_entropy(model(inputs), y, reduction="sum"), inputs)
    >>> penalty.shape, bool(penalty > 0)
    (torch.Size([]), True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adversarial_perturbation",
    "default_step_size",
    "explanation_penalty",
    "finite_difference_gradient_penalty",
    "input_gradient_penalty",
    "twice_differentiable_attention",
]

LogitsFn = Callable[[Tensor], Tensor]
_TINY = 1e-12


def default_step_size(epsilon: float, steps: int) -> float:
    """``1.25 * epsilon`` for one step (Wong et al.'s fast AT), ``2.5 * epsilon / steps`` for PGD (Madry et al.)."""
    return 1.25 * epsilon if steps == 1 else 2.5 * epsilon / steps


def _per_sample_norm(values: Tensor) -> Tensor:
    """``||v_i||_2`` of each sample, shaped to broadcast against ``values``."""
    return values.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (values.dim() - 1)))


def _project(delta: Tensor, epsilon: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    return delta * (epsilon / _per_sample_norm(delta)).clamp(max=1.0)


def _random_start(images: Tensor, epsilon: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """Uniform in the ``l_inf`` ball; on the ``l_2`` sphere (as the ``robustness`` library starts)."""
    if norm == "linf":
        noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return (2 * noise - 1) * epsilon
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return noise / _per_sample_norm(noise) * epsilon


def adversarial_perturbation(
    logits_of: LogitsFn,
    images: Tensor,
    labels: Tensor,
    *,
    epsilon: float,
    norm: str = "linf",
    steps: int = 1,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The PGD perturbation ``delta`` (detached, ``||delta|| <= epsilon``) that raises the cross-entropy.

    Each step: ``delta += step_size * sign(g)`` (``l_inf``) or ``step_size * g / ||g||_2`` (``l_2``,
    per sample), then projection onto the ball; ``g`` is the input gradient of the summed
    cross-entropy. ``logits_of`` is called in whatever mode the caller set (``eval()`` for training,
    see the module docstring); only ``delta`` receives gradients.
    """
    step_size = default_step_size(epsilon, steps) if step_size is None else step_size
    images = images.detach()
    if random_start:
        delta = _random_start(images, epsilon, norm, generator)
    else:
        delta = torch.zeros_like(images)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(logits_of(images + delta).float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            direction = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad)
            delta = _project(delta + step_size * direction, epsilon, norm)
    return delta.detach()


@contextlib.contextmanager
def twice_differentiable_attention(enabled: bool = True) -> Iterator[None]:
    """Run the body's scaled-dot-product attention by PyTorch's math backend, which is twice differentiable.

    The fused kernels the dispatcher picks otherwise (flash, memory-efficient, the CPU flash kernel)
    have no derivative of their backward, so a term that back-propagates through an input gradient
    (``input_gradient_penalty``, ``explanation_penalty``) fails on every attention model (transformers
    ViT / DeiT / Swin with ``attn_implementation="sdpa"``, timm ViTs). The forward that builds such a
    term's graph runs inside this; the package picks it, the user sets nothing. Models without
    attention are unaffected.

    Example:
        >>> q = torch.randn(1, 2, 4, 8, requires_grad=True)
        >>> with twice_differentiable_attention():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        ...     (grad,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        >>> grad.pow(2).sum().backward()  # the second derivative exists
        >>> q.grad.shape
        torch.Size([1, 2, 4, 8])
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def input_gradient_penalty(summed_loss: Tensor, inputs: Tensor) -> Tensor:
    """``mean_i ||d loss_i / d x_i||^2`` by double back-propagation (differentiable in the parameters).

    ``summed_loss``: the per-sample losses summed (so each sample's gradient is its own loss's);
    ``inputs``: the leaf they were computed from, with ``requires_grad``.
    """
    (grad,) = torch.autograd.grad(summed_loss, inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def finite_difference_gradient_penalty(
    per_sample_loss: Tensor, inputs: Tensor, logits_of: LogitsFn, labels: Tensor, step: float
) -> Tensor:
    """``mean_i ((loss_i(x_i + h d_i) - loss_i(x_i)) / h)^2`` with ``d_i`` the detached unit input gradient.

    Equals ``input_gradient_penalty`` to first order in ``h`` (the directional derivative along the
    gradient is its norm) and needs no second-order graph: one more forward on ``x + h d``.
    """
    (grad,) = torch.autograd.grad(per_sample_loss.sum(), inputs, retain_graph=True)
    direction = (grad / _per_sample_norm(grad)).detach()
    shifted = inputs.detach() + step * direction
    shifted_loss = F.cross_entropy(logits_of(shifted).float(), labels, reduction="none")
    return ((shifted_loss - per_sample_loss) / step).pow(2).mean()


def explanation_penalty(logits: Tensor, inputs: Tensor, object_masks: Tensor) -> Tensor:
    """RRR's "right reasons" term: ``mean_i sum (1 - mask_i) * (d sum_k log p_k / d x_i)^2``.

    ``object_masks``: ``(B, H, W)`` or ``(B, 1, H, W)``, 1 (or True) on the pixels that carry the
    class; the penalty acts on the others, summed over channels.
    """
    masks = object_masks.to(device=inputs.device, dtype=torch.float32)
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.shape[0] != inputs.shape[0] or masks.shape[-2:] != inputs.shape[-2:]:
        raise ValueError(
            f"masks has shape {tuple(object_masks.shape)} but the images are {tuple(inputs.shape)}: give one "
            "(H, W) mask per image, 1 on the object, at the images' size."
        )
    summed_log_probs = F.log_softmax(logits.float(), dim=-1).sum()
    (grad,) = torch.autograd.grad(summed_log_probs, inputs, create_graph=True)
    return ((1.0 - masks) * grad.float().pow(2)).flatten(1).sum(1).mean()
