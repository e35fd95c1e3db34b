"""ROAD's noisy linear imputation (Rong et al., ICML 2022), batched on the device.

Each removed pixel becomes the weighted mean of its in-image 8 neighbours (weight 1/6 for the
four direct ones, 1/12 for the diagonals, renormalised at the border), solved *jointly* over all
removed pixels, then absolute Gaussian noise (``noise``, ROAD's default 0.01) is added to the
imputed pixels. The reference (``road/imputations.py``, ``NoisyLinearImputer``) builds a sparse
system per image and solves it with scipy on the CPU; here the system of every image and channel
is solved at once by Jacobi-preconditioned conjugate gradients, the operator being a 3x3
convolution restricted to the removed pixels, started from a coarse-to-fine guess.

The system is symmetric positive definite wherever a group of removed pixels touches a kept
one; a group with no kept pixel at all (e.g. 100% removed) keeps its starting value, the
channel mean of the image.

Example:
    >>> import torch
    >>> image = torch.arange(9.0).view(1, 1, 3, 3)
    >>> removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    >>> removed[0, 1, 1] = True  # the centre, surrounded by 0..8 without 4
    >>> float(noisy_linear_impute(image, removed, noise=0.0)[0, 0, 1, 1])
    4.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["noisy_linear_impute"]


def _neighbour_sum(values: Tensor) -> Tensor:
    """``sum_j w_ij values_j`` over the in-image 8 neighbours (zero padding) of ``(N, 1, H, W)`` planes.

    ROAD's kernel is ``outer([1, 2, 1], [1, 2, 1]) / 12`` without its centre, so it runs as two
    1-D passes of shifted adds (a 1-channel ``conv2d`` is several times slower on the CPU).
    """
    padded = F.pad(values, (1, 1, 1, 1))
    rows = padded[..., :, :-2] + 2 * padded[..., :, 1:-1] + padded[..., :, 2:]
    both = rows[..., :-2, :] + 2 * rows[..., 1:-1, :] + rows[..., 2:, :]
    return both / 12 - values / 3


def _coarse_guess(planes: Tensor, known: Tensor, levels: int) -> Tensor:
    """A smooth fill of the unknown pixels by averaging known ones over a pyramid (push-pull).

    Only a starting point for the solver: its accuracy changes the iteration count, not the result.
    """
    if levels == 0 or min(planes.shape[-2:]) < 4:
        total = (planes * known).sum((2, 3), keepdim=True)
        count = known.sum((2, 3), keepdim=True)
        mean_of_known = total / count.clamp_min(1e-12)
        return torch.where(count > 0, mean_of_known, planes.mean((2, 3), keepdim=True)).expand_as(planes)
    down_values = F.avg_pool2d(planes * known, 2, ceil_mode=True)
    down_known = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse_known = (down_known > 0).to(planes.dtype)
    coarse = torch.where(down_known > 0, down_values / down_known.clamp_min(1e-12), torch.zeros_like(down_values))
    filled = _coarse_guess(coarse, coarse_known, levels - 1)
    coarse = torch.where(coarse_known > 0, coarse, filled)
    up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    up = up[..., : planes.shape[-2], : planes.shape[-1]]
    return torch.where(known > 0, planes, up)


def noisy_linear_impute(
    images: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tolerance: float | None = None,
    max_iterations: int | None = None,
    check_every: int = 8,
) -> Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels of ``images``.

    Args:
        images: ``(B, C, H, W)`` floating point.
        removed: ``(B, H, W)`` (or ``(B, 1, H, W)``) boolean, True where a pixel is removed (the
            reference's ``mask == 0``).
        noise: standard deviation of the absolute Gaussian noise added to imputed pixels
            (ROAD: 0.01; 0 for the plain linear imputation).
        generator: seeds the noise.
        tolerance: the solver stops when every plane's residual norm is below ``tolerance``
            times the norm of its right-hand side (default: 1e-6 in float32, near its round-off,
            1e-10 in float64).
        max_iterations: cap on conjugate-gradient iterations (default ``4 * (H + W)``).
        check_every: iterations between convergence checks (each check reads one flag on the host).

    Returns:
        ``images`` with the removed pixels imputed, same shape, dtype and device.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating point (B, C, H, W) tensor, got {tuple(images.shape)}.")
    batch, channels, height, width = images.shape
    if removed.dim() == 4:
        removed = removed[:, 0]
    if removed.shape != (batch, height, width):
        raise ValueError(f"removed must have shape (B, H, W) = {(batch, height, width)}, got {tuple(removed.shape)}.")
    # solve in float32 at least (half precision cannot reach the tolerance)
    dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    planes = images.to(dtype).reshape(batch * channels, 1, height, width)
    missing = removed.to(dtype).repeat_interleave(channels, 0).unsqueeze(1)
    known = 1.0 - missing
    weight_sum = _neighbour_sum(torch.ones_like(planes[:1]))  # s_i: in-image neighbour weights
    rhs = missing * _neighbour_sum(known * planes)
    levels = max(0, min(height, width).bit_length() - 2)
    guess = _coarse_guess(planes, known, levels)
    nothing_known = known.sum((2, 3), keepdim=True) == 0
    solution = missing * torch.where(nothing_known, planes.mean((2, 3), keepdim=True), guess)
    tolerance = tolerance if tolerance is not None else (1e-10 if dtype == torch.float64 else 1e-6)
    threshold = (tolerance * rhs.flatten(1).norm(dim=1)).clamp_min(1e-30)
    threshold[nothing_known.flatten()] = float("inf")  # nothing to solve: the mean stays
    limit = max_iterations if max_iterations is not None else 4 * (height + width)
    _conjugate_gradients(solution, rhs, missing, weight_sum, threshold, limit, check_every)
    imputed = known * planes + solution
    if noise > 0:
        draw = torch.randn(imputed.shape, generator=generator, device=images.device, dtype=dtype)
        imputed = imputed + missing * noise * draw
    return imputed.view(batch, channels, height, width).to(images.dtype)


def _conjugate_gradients(
    solution: Tensor,
    rhs: Tensor,
    missing: Tensor,
    weight_sum: Tensor,
    threshold: Tensor,
    limit: int,
    check_every: int,
) -> None:
    """Jacobi-preconditioned CG on every plane at once, in place on ``solution`` (the start).

    Solves ``missing * (S x - W (missing * x)) = rhs`` per plane. Planes that have converged at
    a check leave the active set, so a batch mixing small and large holes pays for each its own.
    """
    active = torch.arange(solution.shape[0], device=solution.device)
    x, missing_active, limit_active = solution.clone(), missing, threshold

    def operator(v: Tensor) -> Tensor:  # (S - W_mm) v on the removed pixels, 0 elsewhere
        return missing_active * (weight_sum * v - _neighbour_sum(missing_active * v))

    residual = rhs - operator(x)
    preconditioned = missing_active * residual / weight_sum
    direction = preconditioned
    rho = (residual * preconditioned).sum((1, 2, 3), keepdim=True)
    for iteration in range(limit + 1):
        if iteration % check_every == 0 or iteration == limit:
            running = residual.flatten(1).norm(dim=1) > limit_active
            if iteration == limit or not bool(running.all()):
                solution[active] = x
                if iteration == limit or not bool(running.any()):
                    return
                active, x, residual, direction, rho = (t[running] for t in (active, x, residual, direction, rho))
                missing_active, limit_active = missing_active[running], limit_active[running]
        applied = operator(direction)
        curvature = (direction * applied).sum((1, 2, 3), keepdim=True)
        step = torch.where(curvature > 0, rho / curvature.clamp_min(1e-30), torch.zeros_like(rho))
        x = x + step * direction
        residual = residual - step * applied
        preconditioned = missing_active * residual / weight_sum
        rho_next = (residual * preconditioned).sum((1, 2, 3), keepdim=True)
        direction = preconditioned + torch.where(rho > 0, rho_next / rho.clamp_min(1e-30), 0.0) * direction
        rho = rho_next
