"""ROAD's noisy linear imputation (Rong et al., ICML 2022), batched on the device.

Each removed pixel becomes the weighted mean of its in-image 8 neighbours (weight 1/6 for the
four direct ones, 1/12 for the diagonals, renormalised at the border), solved *jointly* over all
removed pixels, then absolute Gaussian noise (``noise``, ROAD's default 0.01) is added to the
imputed pixels. The reference (``road/imputations.py``, ``NoisyLinearImputer``) builds a sparse
system per image and solves it with scipy on the CPU; here the systems of every image and channel
are solved at once by conjugate gradients preconditioned with a multigrid V-cycle
(:mod:`sd_plugin.evaluation.multigrid`), whose iteration count does not grow with the size of the
holes (5 to 10 iterations from 10% to 90% removed, 28 to 224 px), started from a coarse-to-fine
guess. The channels of an image share its operator and its multigrid hierarchy. On the CPU a batch
of more than ``VALUES_PER_SOLVE`` pixel values is solved a group of images at a time (cache-sized).

The system is symmetric positive definite wherever a group of removed pixels touches a kept
one; an image with no kept pixel at all (100% removed) gets the channel mean of the image.

Example:
    >>> import torch
    >>> image = torch.arange(9.0).view(1, 1, 3, 3)
    >>> removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    >>> removed[0, 1, 1] = True  # the centre, surrounded by 0..8 without 4
    >>> float(noisy_linear_impute(image, removed, noise=0.0)[0, 0, 1, 1])
    4.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .multigrid import OFFSETS, Stencil, VCycle, empty_with_zero_ends, from_padded_flat, interior, to_padded_flat

__all__ = ["VALUES_PER_SOLVE", "images_per_solve", "noisy_linear_impute"]

# pixel values per solve on the CPU (~4 MB per vector in float32): past it the solver's vectors fall
# out of cache, below it fixed per-call costs grow. Measured best of 2^18..2^24 at 28, 64 and 224 px
# (224 px: 39 ms per image at 2^20, 57 ms solving 32 images at once; the command's output is
# benchmarks/results/road-values-per-solve-cpu.json). Callers group their work up to it.
VALUES_PER_SOLVE = 2**20


def images_per_solve(channels: int, height: int, width: int) -> int:
    """How many images of this shape one CPU solve takes: ``VALUES_PER_SOLVE`` values, the solver's
    padded layout counted (at least one image).

    Example:
        >>> images_per_solve(1, 28, 28)  # 30 x 30 padded values an image
        1165
    """
    return max(1, VALUES_PER_SOLVE // (channels * (height + 2) * (width + 2)))


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


# ROAD's neighbour weights: 1/6 for the four direct neighbours, 1/12 for the diagonals
_WEIGHTS = {(dy, dx): (1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy, dx in OFFSETS if (dy, dx) != (0, 0)}


def noisy_linear_impute(
    images: Tensor,
    removed: Tensor,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tolerance: float | None = None,
    max_iterations: int = 100,
    check_every: int = 1,
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
            times the norm of its right-hand side (default 1e-5 for float32 and half precision,
            solved in float32 with one float64 refinement step; 1e-10 in float64).
        max_iterations: cap on conjugate-gradient iterations; reaching it without converging
            warns (a RuntimeWarning naming both settings).
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
    planes = images.to(dtype)
    missing = removed.to(dtype).unsqueeze(1)  # (B, 1, H, W)
    tolerance = tolerance if tolerance is not None else (1e-10 if dtype == torch.float64 else 1e-5)
    removed_count = missing.sum((1, 2, 3))
    nothing_known = removed_count == height * width
    solvable = (removed_count > 0) & ~nothing_known
    settings = dict(tolerance=tolerance, limit=max_iterations, check_every=check_every)
    if bool(solvable.all()):
        imputed = _solve_in_chunks(planes, missing, **settings)
    else:  # images with nothing removed stay; with nothing kept, the channel mean fills them
        imputed = planes.clone()
        imputed[nothing_known] = planes[nothing_known].mean((2, 3), keepdim=True).expand(-1, -1, height, width)
        if bool(solvable.any()):
            imputed[solvable] = _solve_in_chunks(planes[solvable], missing[solvable], **settings)
    if noise > 0:
        draw = torch.randn(imputed.shape, generator=generator, device=images.device, dtype=dtype)
        imputed = imputed + missing * noise * draw
    return imputed.to(images.dtype)


def _solve_in_chunks(planes: Tensor, missing: Tensor, **settings) -> Tensor:
    """``_solve`` over groups of images of at most ``VALUES_PER_SOLVE`` values on the CPU (one on a GPU)."""
    batch = planes.shape[0]
    per_solve = images_per_solve(*planes.shape[1:])
    if planes.device.type != "cpu" or batch <= per_solve:
        return _solve(planes, missing, **settings)
    parts = [
        _solve(planes[start : start + per_solve], missing[start : start + per_solve], **settings)
        for start in range(0, batch, per_solve)
    ]
    return torch.cat(parts)


def _solve(planes: Tensor, missing: Tensor, tolerance: float, limit: int, check_every: int) -> Tensor:
    """The imputed images: multigrid-preconditioned CG on every image and channel at once.

    In float32 this is two float32 solves, each to ``sqrt(tolerance)``: iterative refinement, the
    second one solving for the correction from the first one's residual taken in float64. A large
    hole makes the system ill-conditioned (smallest eigenvalue ~ (pi / hole width)^2), enough for
    float32 round-off alone to move a 224 px imputation by up to 1.5e-3 (a 99% hole,
    ``tests/test_multigrid.py``); with the step the benchmark's worst case is 2.8e-5
    (``benchmarks/road_imputation_cost.py``).
    """
    height, width = planes.shape[-2:]
    known = 1.0 - missing
    weight_sum = _neighbour_sum(torch.ones_like(missing[:1]))  # s_i: in-image neighbour weights
    rhs = to_padded_flat(missing * _neighbour_sum(known * planes))
    operator = _RoadOperator(missing, weight_sum)
    preconditioner = VCycle(operator.stencil(), fine_apply=operator)
    levels = max(0, min(height, width).bit_length() - 2)
    start = to_padded_flat(missing * _coarse_guess(planes, known.expand_as(planes), levels))
    refine = planes.dtype == torch.float32 and planes.device.type != "mps"  # MPS has no float64
    stage_tolerance = tolerance**0.5 if refine else tolerance  # the two stages multiply their reductions
    rhs_norm = rhs.norm(dim=-1)
    settings = dict(tolerance=tolerance, limit=limit, check_every=check_every)
    solution = _preconditioned_cg(operator, preconditioner, rhs, start, stage_tolerance * rhs_norm, **settings)
    if refine:
        exact_missing, exact_planes = missing.double(), planes.double()
        exact_rhs = to_padded_flat(exact_missing * _neighbour_sum((1.0 - exact_missing) * exact_planes))
        exact_residual = exact_rhs - _RoadOperator(exact_missing, weight_sum.double())(solution.double())
        residual = exact_residual.float()
        # below float32's round-off of the first residual there is nothing left to correct (an
        # exact first stage, e.g. a grid the coarsest solve covers, leaves a residual of ~1e-18)
        floor = 10 * torch.finfo(torch.float32).eps * rhs_norm
        threshold = torch.maximum(stage_tolerance * residual.norm(dim=-1), floor)
        correction = _preconditioned_cg(
            operator, preconditioner, residual, torch.zeros_like(residual), threshold, **settings
        )
        solution = (solution.double() + correction.double()).float()
    return known * planes + from_padded_flat(solution, height, width)


def _preconditioned_cg(
    operator: Callable[[Tensor], Tensor],
    preconditioner: Callable[[Tensor], Tensor],
    rhs: Tensor,
    solution: Tensor,
    threshold: Tensor,
    tolerance: float,
    limit: int,
    check_every: int,
) -> Tensor:
    """Solve ``operator(x) = rhs`` plane by plane from ``solution`` (updated in place and returned).

    Stops when every plane's residual norm is at most its ``threshold`` ``(B, C)``; warns, naming
    the caller's ``tolerance``, if ``limit`` iterations do not get there.
    """
    threshold = threshold.clamp_min(1e-30)
    residual = rhs - operator(solution)
    preconditioned = preconditioner(residual)
    direction = preconditioned
    rho = (residual * preconditioned).sum(-1, keepdim=True)
    for iteration in range(limit + 1):
        if iteration % check_every == 0 or iteration == limit:
            if bool((residual.norm(dim=-1) <= threshold).all()):
                break
            if iteration == limit:
                warnings.warn(
                    f"noisy_linear_impute: the solver did not reach tolerance={tolerance:g} in "
                    f"max_iterations={limit}; raise either (the result is the last iterate).",
                    RuntimeWarning,
                    stacklevel=4,
                )
                break
        applied = operator(direction)
        curvature = (direction * applied).sum(-1, keepdim=True)
        step = torch.where(curvature > 0, rho / curvature.clamp_min(1e-30), torch.zeros_like(rho))
        solution.addcmul_(step, direction)
        residual.addcmul_(step, applied, value=-1)
        preconditioned = preconditioner(residual)
        rho_next = (residual * preconditioned).sum(-1, keepdim=True)
        direction = torch.addcmul(preconditioned, torch.where(rho > 0, rho_next / rho.clamp_min(1e-30), 0.0), direction)
        rho = rho_next
    return solution


class _RoadOperator:
    """``x -> M (S x - W x)`` on padded flat planes that are zero outside the removed pixels ``M``.

    ``S x - W x = (S + 1/3) x - (k * x) / 12`` with ``k = outer([1, 2, 1], [1, 2, 1])``, run as two
    1-D passes over the flat buffer (a neighbour is a constant offset there).
    """

    def __init__(self, missing: Tensor, weight_sum: Tensor) -> None:
        self.height, self.width = missing.shape[-2:]
        self.diagonal = to_padded_flat(missing * (weight_sum + 1 / 3))
        self.scale = to_padded_flat(missing / 12)
        self.missing, self.weight_sum = missing, weight_sum

    def stencil(self) -> Stencil:
        """The operator as nine coefficient planes (for the multigrid hierarchy)."""
        missing, weight_sum = self.missing, self.weight_sum
        coefficients = missing.new_zeros(missing.shape[0], 9, self.height, self.width)
        padded = F.pad(missing, (1, 1, 1, 1))
        for k, (dy, dx) in enumerate(OFFSETS):
            if (dy, dx) == (0, 0):
                coefficients[:, k : k + 1] = missing * weight_sum
            else:
                shifted = padded[..., 1 + dy : 1 + dy + self.height, 1 + dx : 1 + dx + self.width]
                coefficients[:, k : k + 1] = -_WEIGHTS[(dy, dx)] * missing * shifted
        return Stencil(coefficients)

    def __call__(self, values: Tensor) -> Tensor:
        stride, inside = self.width + 2, interior(self.height, self.width)
        rows = torch.add(values[..., :-2], values[..., 1:-1], alpha=2).add_(values[..., 2:])  # centred at 1..L-2
        start, stop = inside.start - 1, inside.stop - 1  # rows[q] is centred at q + 1
        both = torch.add(rows[..., start - stride : stop - stride], rows[..., start:stop], alpha=2)
        both.add_(rows[..., start + stride : stop + stride])
        out = empty_with_zero_ends(values, inside)
        segment = out[..., inside]
        torch.mul(self.diagonal[..., inside], values[..., inside], out=segment)
        segment.addcmul_(self.scale[..., inside], both, value=-1)
        return out
