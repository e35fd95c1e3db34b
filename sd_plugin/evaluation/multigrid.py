"""A geometric multigrid V-cycle for 9-point stencils on image grids, batched, as a CG preconditioner.

An operator is a :class:`Stencil`: nine coefficient planes ``(B, 9, H, W)``, plane ``k`` holding
``A[(y, x), (y + dy, x + dx)]`` for the offset ``(dy, dx) = OFFSETS[k]``; it acts on the ``C``
channels of each image at once. Vectors live in a *padded flat* layout, ``(B, C, (H + 2) * (W + 2))``
with a ring of zeros around each plane (:func:`to_padded_flat`), so that every neighbour is a
constant offset and a stencil is nine multiply-adds over contiguous memory.

Coarse operators are Galerkin products ``P^T A P`` with vertex-centred bilinear interpolation ``P``
(a 9-point stencil stays 9-point), so a pixel the fine operator leaves out (a zero row) never
enters a coarse one and holes of any shape need no special case. The smoother is damped Jacobi, one
sweep before and one after the coarse correction, and the coarsest grid (at most ``coarsest`` pixels
a side) is solved exactly with a dense pseudo-inverse: the cycle is a fixed, symmetric linear operator,
which is what conjugate gradients needs of a preconditioner.

Example (ROAD's stencil on a 33 x 33 hole with a kept border; four cycles as a plain iteration):
    >>> import torch
    >>> weights = torch.tensor([1 / 12, 1 / 6, 1 / 12, 1 / 6, -1.0, 1 / 6, 1 / 12, 1 / 6, 1 / 12])
    >>> stencil = Stencil(-weights.view(1, 9, 1, 1).expand(1, 9, 33, 33).clone())
    >>> cycle = VCycle(stencil)
    >>> rhs = to_padded_flat(torch.ones(1, 1, 33, 33))
    >>> solution = torch.zeros_like(rhs)
    >>> for _ in range(4):
    ...     solution += cycle(rhs - stencil.apply(solution))
    >>> bool((stencil.apply(solution) - rhs).norm() / rhs.norm() < 0.1)
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OFFSETS", "Stencil", "VCycle", "empty_with_zero_ends", "from_padded_flat", "interior", "to_padded_flat"]

OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # plane k of a stencil: OFFSETS[k]
_CENTRE = 4
# vertex-centred bilinear interpolation in one dimension: fine 2I + a takes weight _TENT[a] of coarse I
_TENT = {-1: 0.5, 0: 1.0, 1: 0.5}
# the Galerkin product per dimension: (fine offset a of the row, stencil offset d, coarse offset D,
# fine offset b = a + d - 2D of the column), b in {-1, 0, 1}
_GALERKIN_1D = [(a, d, (a + d - b) // 2, b) for a in (-1, 0, 1) for d in (-1, 0, 1) for b in (-1, 0, 1)
                if (a + d - b) % 2 == 0]  # fmt: skip


def to_padded_flat(planes: Tensor) -> Tensor:
    """``(..., H, W)`` -> ``(..., (H + 2) * (W + 2))``: a ring of zeros around each plane, flattened."""
    return F.pad(planes, (1, 1, 1, 1)).flatten(-2)


def from_padded_flat(flat: Tensor, height: int, width: int) -> Tensor:
    """The ``(..., H, W)`` interior of a padded flat tensor (a view)."""
    return flat.view(*flat.shape[:-1], height + 2, width + 2)[..., 1:-1, 1:-1]


def interior(height: int, width: int) -> slice:
    """The flat positions whose 8 neighbours all lie in the padded buffer (every pixel lies there)."""
    return slice(width + 3, (height + 2) * (width + 2) - width - 3)


def empty_with_zero_ends(like: Tensor, inside: slice) -> Tensor:
    """An uninitialised tensor like ``like`` but zero outside ``inside`` (the first and last rows)."""
    out = torch.empty_like(like)
    out[..., : inside.start] = 0
    out[..., inside.stop :] = 0
    return out


class Stencil:
    """A 9-point operator with per-pixel coefficients ``(B, 9, H, W)`` (see the module docstring)."""

    def __init__(self, coefficients: Tensor) -> None:
        self.coefficients = coefficients
        self.height, self.width = coefficients.shape[-2:]
        self._flat = to_padded_flat(coefficients)
        stride = self.width + 2
        self._offsets = [dy * stride + dx for dy, dx in OFFSETS]

    def apply(self, values: Tensor) -> Tensor:
        """``A values`` for padded flat ``values`` ``(B, C, L)``; the ring stays zero."""
        inside = interior(self.height, self.width)
        out = empty_with_zero_ends(values, inside)
        segment = out[..., inside]
        torch.mul(self._flat[:, _CENTRE : _CENTRE + 1, inside], values[..., inside], out=segment)
        start, stop = inside.start, inside.stop
        for k, offset in enumerate(self._offsets):
            if k != _CENTRE:
                segment.addcmul_(self._flat[:, k : k + 1, inside], values[..., start + offset : stop + offset])
        return out

    @property
    def diagonal(self) -> Tensor:
        """``(B, 1, L)`` padded flat: the centre coefficient."""
        return self._flat[:, _CENTRE : _CENTRE + 1]

    def coarsened(self) -> Stencil:
        """The Galerkin operator ``P^T A P`` on the grid of every other pixel (``H // 2 + 1`` a side).

        ``P`` is a tensor product, so the product runs one dimension at a time: columns first
        (fine rows, coarse columns), then rows, each pass 13 strided multiply-adds over all planes.
        """
        batch, _, height, width = self.coefficients.shape
        coarse_height, coarse_width = height // 2 + 1, width // 2 + 1
        # fine index 2I + a (a in -1..1) exists for every coarse I: -1 .. 2 * Hc - 1, zero-padded
        padded = F.pad(self.coefficients, (1, 2 * coarse_width - width, 0, 0))
        half = self.coefficients.new_zeros(batch, 9, height, coarse_width)
        for a, d, big, b in _GALERKIN_1D:  # planes with column offset d -> coarse column offset big
            columns = slice(1 + a, 1 + a + 2 * coarse_width - 1, 2)
            half[:, big + 1 :: 3].add_(padded[:, d + 1 :: 3, :, columns], alpha=_TENT[a] * _TENT[b])
        padded = F.pad(half, (0, 0, 1, 2 * coarse_height - height))
        coarse = self.coefficients.new_zeros(batch, 9, coarse_height, coarse_width)
        for a, d, big, b in _GALERKIN_1D:  # planes with row offset d -> coarse row offset big
            rows = slice(1 + a, 1 + a + 2 * coarse_height - 1, 2)
            source = padded[:, 3 * (d + 1) : 3 * (d + 2), rows]
            coarse[:, 3 * (big + 1) : 3 * (big + 2)].add_(source, alpha=_TENT[a] * _TENT[b])
        # an entry reaching outside the coarse grid would multiply the zero ring: drop it (symmetry)
        ring = F.pad(coarse.new_ones(coarse_height, coarse_width), (1, 1, 1, 1))
        windows = [ring[1 + dy : 1 + dy + coarse_height, 1 + dx : 1 + dx + coarse_width] for dy, dx in OFFSETS]
        reach = torch.stack(windows)
        return Stencil(coarse * reach)


def restrict(values: Tensor, fine_size: tuple[int, int], coarse_size: tuple[int, int]) -> Tensor:
    """``P^T values`` (padded flat in and out): coarse ``I`` gathers fine ``2I-1 .. 2I+1`` bilinearly.

    With the zero ring, fine ``2I-1 .. 2I+1`` are padded ``2I .. 2I+2``; on an even grid the last
    coarse pixel's ``2I + 2`` lies past the ring (zero), so that term stops one pixel short.
    """
    (height, width), (coarse_height, coarse_width) = fine_size, coarse_size
    planes = values.view(*values.shape[:-1], height + 2, width + 2)
    last_rows, last_columns = (height + 1) // 2, (width + 1) // 2  # coarse pixels whose 2I + 2 exists
    odd, even = planes[..., 1 : 2 * coarse_height : 2, :], planes[..., 0 : 2 * coarse_height - 1 : 2, :]
    rows = torch.add(odd, even, alpha=0.5)
    rows[..., :last_rows, :].add_(planes[..., 2::2, :][..., :last_rows, :], alpha=0.5)
    both = torch.add(rows[..., 1 : 2 * coarse_width : 2], rows[..., 0 : 2 * coarse_width - 1 : 2], alpha=0.5)
    both[..., :last_columns].add_(rows[..., 2::2][..., :last_columns], alpha=0.5)
    return to_padded_flat(both)


def prolong(values: Tensor, coarse_size: tuple[int, int], fine_size: tuple[int, int]) -> Tensor:
    """``P values`` (padded flat in and out): bilinear interpolation back to the fine grid, cropped.

    Vertex-centred: fine ``2I`` is coarse ``I``, fine ``2I + 1`` the mean of coarse ``I`` and ``I + 1``.
    """
    (coarse_height, coarse_width), (height, width) = coarse_size, fine_size
    coarse = from_padded_flat(values, coarse_height, coarse_width)
    rows = coarse.new_empty(*coarse.shape[:-2], height, coarse_width)
    rows[..., 0::2, :] = coarse[..., : (height + 1) // 2, :]
    if height > 1:
        torch.add(coarse[..., : height // 2, :], coarse[..., 1 : height // 2 + 1, :], out=rows[..., 1::2, :])
        rows[..., 1::2, :] *= 0.5
    fine = coarse.new_zeros(*coarse.shape[:-2], height + 2, width + 2)
    inner = fine[..., 1 : 1 + height, 1 : 1 + width]
    inner[..., 0::2] = rows[..., : (width + 1) // 2]
    odd = inner[..., 1::2]
    torch.add(rows[..., : width // 2], rows[..., 1 : width // 2 + 1], out=odd)
    odd.mul_(0.5)
    return fine.view(*values.shape[:-1], -1)


class VCycle:
    """One symmetric V-cycle for ``stencil`` from a zero start: ``z = cycle(r)``, padded flat.

    Args:
        stencil: the fine operator; its zero rows (pixels outside the problem) stay zero in ``z``.
        coarsest: grids at most this many pixels a side are solved exactly.
        damping: the fine level's Jacobi damping (1 suits ROAD's stencil, whose Jacobi smoothing
            factor is then 1/3).
        coarse_damping: the coarse levels' (Galerkin stencils have a wider spectrum).
        fine_apply: a faster way to apply the fine operator, if any (same result as ``stencil.apply``).
    """

    def __init__(
        self,
        stencil: Stencil,
        coarsest: int = 5,
        damping: float = 1.0,
        coarse_damping: float = 0.8,
        fine_apply: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.levels = [stencil]
        while max(self.levels[-1].height, self.levels[-1].width) > coarsest:
            self.levels.append(self.levels[-1].coarsened())
        self.applies = [fine_apply or stencil.apply] + [level.apply for level in self.levels[1:]]
        self.smoothers, self.active = [], []
        for index, level in enumerate(self.levels):
            diagonal = level.diagonal
            active = diagonal > 0
            inverse = torch.where(active, 1 / diagonal.clamp_min(1e-30), torch.zeros_like(diagonal))
            self.smoothers.append(inverse * (damping if index == 0 else coarse_damping))
            self.active.append(active.to(diagonal.dtype))
        self.coarse_inverse = _dense_pseudo_inverse(self.levels[-1]).unsqueeze(1)

    def __call__(self, residual: Tensor) -> Tensor:
        return self._cycle(0, residual)

    def _cycle(self, index: int, residual: Tensor) -> Tensor:
        level = self.levels[index]
        if index == len(self.levels) - 1:
            planes = from_padded_flat(residual, level.height, level.width)
            flat = planes.reshape(*planes.shape[:-2], -1, 1)
            solved = (self.coarse_inverse @ flat).view(planes.shape)
            return to_padded_flat(solved)
        apply, smoother, coarse = self.applies[index], self.smoothers[index], self.levels[index + 1]
        fine_size, coarse_size = (level.height, level.width), (coarse.height, coarse.width)
        solution = smoother * residual
        remainder = residual - apply(solution)
        correction = self._cycle(index + 1, restrict(remainder, fine_size, coarse_size))
        solution.addcmul_(prolong(correction, coarse_size, fine_size), self.active[index])
        solution.addcmul_(smoother, residual - apply(solution))
        return solution


def _dense_pseudo_inverse(stencil: Stencil) -> Tensor:
    """``(B, n, n)``: the pseudo-inverse of the stencil's matrix (zero rows and columns stay zero).

    A pseudo-inverse, because a Galerkin operator is singular where bilinear interpolation from
    several coarse pixels reaches a single fine one (the null space is that of ``P``, which the
    correction ``P A_c^+ P^T`` never sees). Eigenvalues within the round-off of the coefficients'
    dtype count as zero: in float32 a null direction comes out at ~1e-8, not 0.
    """
    coefficients = stencil.coefficients
    batch, _, height, width = coefficients.shape
    count = height * width
    matrix = coefficients.new_zeros(batch, count, count, dtype=torch.float64)
    index = torch.arange(count, device=coefficients.device).view(height, width)
    for k, (dy, dx) in enumerate(OFFSETS):
        y, x = index // width + dy, index % width + dx
        valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        matrix[:, index[valid], (y * width + x)[valid]] = coefficients[:, k][:, valid].double()
    rtol = 1e3 * torch.finfo(coefficients.dtype).eps
    return torch.linalg.pinv(matrix, rtol=rtol, hermitian=True).to(coefficients.dtype)
