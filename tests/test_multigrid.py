"""The multigrid preconditioner of ROAD's imputation, against dense matrices built pixel by pixel."""

from __future__ import annotations

import pytest
import torch
from road_reference import reference_impute_batch

import sd_plugin.evaluation.multigrid as multigrid
from sd_plugin.evaluation.imputation import noisy_linear_impute
from sd_plugin.evaluation.multigrid import OFFSETS, Stencil, VCycle, from_padded_flat, prolong, restrict, to_padded_flat


def dense_matrix(stencil: Stencil) -> torch.Tensor:
    """The stencil's matrix, entry by entry (the naive reading of the coefficient planes)."""
    coefficients = stencil.coefficients[0]
    _, height, width = coefficients.shape
    matrix = torch.zeros(height * width, height * width, dtype=coefficients.dtype)
    for k, (dy, dx) in enumerate(OFFSETS):
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    matrix[y * width + x, (y + dy) * width + x + dx] = coefficients[k, y, x]
    return matrix


def stencil_of(matrix: torch.Tensor, height: int, width: int) -> Stencil:
    coefficients = torch.zeros(1, 9, height, width, dtype=matrix.dtype)
    for k, (dy, dx) in enumerate(OFFSETS):
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    coefficients[0, k, y, x] = matrix[y * width + x, (y + dy) * width + x + dx]
    return Stencil(coefficients)


def random_symmetric_stencil(height: int, width: int, seed: int, shift: float = 0.0) -> Stencil:
    g = torch.Generator().manual_seed(seed)
    raw = dense_matrix(Stencil(torch.randn(1, 9, height, width, generator=g, dtype=torch.float64)))
    return stencil_of(raw + raw.T + shift * torch.eye(height * width, dtype=torch.float64), height, width)


def interpolation_matrix(height: int, width: int) -> torch.Tensor:
    """``P`` column by column: prolong each coarse unit vector."""
    coarse = (height // 2 + 1, width // 2 + 1)
    columns = []
    for index in range(coarse[0] * coarse[1]):
        unit = torch.zeros(1, 1, *coarse, dtype=torch.float64)
        unit.view(-1)[index] = 1
        fine = prolong(to_padded_flat(unit), coarse, (height, width))
        columns.append(from_padded_flat(fine, height, width).flatten())
    return torch.stack(columns, 1)


@pytest.mark.parametrize("size", [(7, 6), (8, 9), (5, 5), (10, 4)])
def test_stencil_restriction_and_galerkin_coarsening__equal_the_dense_products(size):
    height, width = size
    stencil = random_symmetric_stencil(height, width, seed=height * width)
    matrix = dense_matrix(stencil)
    values = torch.randn(1, 2, height, width, dtype=torch.float64)
    applied = from_padded_flat(stencil.apply(to_padded_flat(values)), height, width)
    torch.testing.assert_close(applied.reshape(2, -1), values.reshape(2, -1) @ matrix.T)
    interpolation = interpolation_matrix(height, width)
    # vertex-centred bilinear: every even fine pixel is a coarse one, odd ones average two
    assert torch.allclose(interpolation.sum(1)[:width:2], torch.ones(1, dtype=torch.float64))
    residual = torch.randn(1, 1, height, width, dtype=torch.float64)
    coarse = (height // 2 + 1, width // 2 + 1)
    restricted = from_padded_flat(restrict(to_padded_flat(residual), size, coarse), *coarse).flatten()
    torch.testing.assert_close(restricted, interpolation.T @ residual.flatten())
    coarse_matrix = dense_matrix(stencil.coarsened())
    torch.testing.assert_close(coarse_matrix, interpolation.T @ matrix @ interpolation)


def test_vcycle__is_symmetric_and_its_coarse_solve_is_a_pseudo_inverse():
    height, width = 9, 7
    stencil = random_symmetric_stencil(height, width, seed=1, shift=30.0)
    cycle = VCycle(stencil, coarsest=3)
    assert [level.height for level in cycle.levels] == [9, 5, 3]
    unit = torch.eye(height * width, dtype=torch.float64).view(-1, 1, height, width)
    columns = from_padded_flat(cycle(to_padded_flat(unit).view(1, -1, (height + 2) * (width + 2))), height, width)
    preconditioner = columns.reshape(height * width, height * width)
    torch.testing.assert_close(preconditioner, preconditioner.T)
    assert torch.linalg.eigvalsh(preconditioner).min() > 0  # positive definite: usable by CG
    # a singular coarse operator (bilinear weights of two coarse pixels reaching one fine pixel)
    singular = torch.zeros(2, 2, dtype=torch.float64)
    singular[:] = 1.0
    coarse = stencil_of(singular, 1, 2)
    pseudo = multigrid._dense_pseudo_inverse(coarse)[0]
    torch.testing.assert_close(pseudo, torch.linalg.pinv(singular))


def count_cycles(monkeypatch) -> list[int]:
    calls = [0]
    original = VCycle.__call__

    def counted(self, residual):
        calls[0] += 1
        return original(self, residual)

    monkeypatch.setattr(VCycle, "__call__", counted)
    return calls


def test_imputation__iterations_do_not_grow_with_the_hole(monkeypatch):
    """Jacobi-CG needed on the order of the hole's width in iterations; the V-cycle keeps it flat."""
    calls = count_cycles(monkeypatch)
    counts = {}
    for size in (16, 48, 144):
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        removed = torch.ones(1, size, size, dtype=torch.bool)
        removed[:, 0, 0] = False  # one kept pixel: the hole is the whole image but a corner
        removed[:, size // 2, size // 2] = False
        calls[0] = 0
        noisy_linear_impute(image, removed, noise=0.0)
        counts[size] = calls[0]
    assert max(counts.values()) <= 16, counts
    assert counts[144] <= counts[16] + 4, counts


def test_imputation__a_224_px_hole_equals_the_reference_in_float32():
    """Float32 alone is off by 1.5e-3 here (a near-singular system); the float64 refinement step fixes it."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 224, 224, generator=g)
    removed = torch.ones(1, 224, 224, dtype=torch.bool)
    removed[:, 100:124, 20:40] = False  # 99% removed around one small kept patch
    ours = noisy_linear_impute(images, removed, noise=0.0)
    reference = reference_impute_batch(images.double(), removed)
    assert float((ours.double() - reference).abs().max()) < 1e-4


# a 4 x 4 image, found by search, whose one removed pixel (2, 2) the first stage solves exactly
_EXACT_CASE = ["0x1.ee80f4p-2", "-0x1.372cdcp+0", "0x1.44ca3ep+0", "-0x1.c24cd8p-6", "-0x1.7086b4p-1",
               "-0x1.d9b69ep-1", "0x1.990cf6p+0", "-0x1.afc948p-1", "-0x1.348028p-1", "-0x1.6c31f8p-2",
               "-0x1.f615e2p-3", "0x1.18a1b8p-2", "0x1.4ae758p-7", "0x1.2180d0p-2", "-0x1.1ae072p-2",
               "-0x1.28d352p+0"]  # fmt: skip


def test_imputation__an_exact_first_stage_converges_without_warning():
    """The coarsest solve covers a 4 x 4 grid, so the first stage is exact and its float64 residual
    ~1e-18: the refinement stage must stop at float32 round-off instead of chasing it (it warned)."""
    import warnings

    image = torch.tensor([float.fromhex(value) for value in _EXACT_CASE]).view(1, 1, 4, 4)
    removed = torch.zeros(1, 4, 4, dtype=torch.bool)
    removed[0, 2, 2] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ours = noisy_linear_impute(image, removed, noise=0.0)
    torch.testing.assert_close(ours.double(), reference_impute_batch(image.double(), removed), rtol=0, atol=1e-6)


def test_imputation__splits_a_large_cpu_batch_into_solves_of_values_per_solve(monkeypatch):
    """A batch past ``VALUES_PER_SOLVE`` is solved a few images at a time (cache-sized working set),
    including when some images have nothing removed; each part still equals the reference."""
    import sd_plugin.evaluation.imputation as imputation

    g = torch.Generator().manual_seed(3)
    images = torch.rand(7, 3, 20, 20, generator=g)
    removed = torch.rand(7, 20, 20, generator=g) < 0.6
    removed[4] = False  # nothing removed: stays as it is
    solved_batches = []
    original = imputation._solve

    def recorded(planes, *args, **kwargs):
        solved_batches.append(planes.shape[0])
        return original(planes, *args, **kwargs)

    monkeypatch.setattr(imputation, "_solve", recorded)
    monkeypatch.setattr(imputation, "VALUES_PER_SOLVE", 2 * 3 * 22 * 22)  # two images per solve
    ours = noisy_linear_impute(images, removed, noise=0.0)
    assert solved_batches == [2, 2, 2], solved_batches  # the 6 images with a hole
    holes = [0, 1, 2, 3, 5, 6]
    reference = reference_impute_batch(images[holes].double(), removed[holes])
    torch.testing.assert_close(ours[holes].double(), reference, rtol=0, atol=1e-4)
    assert torch.equal(ours[4], images[4])


def test_road_curve__groups_levels_into_whole_solves_of_the_imputer(monkeypatch):
    """The curve's level grouping and the imputer's split count the same values, so a group of levels
    is one solve (counted without the solver's padding, the group overflowed it: a 12 + 4 split)."""
    import importlib

    import sd_plugin.evaluation.imputation as imputation

    curves = importlib.import_module("sd_plugin.evaluation.masking_curve")
    solves, calls = [], []
    original_solve, original_impute = imputation._solve, curves.noisy_linear_impute

    def recorded_solve(planes, *args, **kwargs):
        solves.append(planes.shape[0])
        return original_solve(planes, *args, **kwargs)

    def recorded_impute(images, *args, **kwargs):
        calls.append(images.shape[0])
        return original_impute(images, *args, **kwargs)

    monkeypatch.setattr(imputation, "_solve", recorded_solve)
    monkeypatch.setattr(curves, "noisy_linear_impute", recorded_impute)
    monkeypatch.setattr(imputation, "VALUES_PER_SOLVE", 12 * 12 * 12)  # 12 padded 10 px grey images
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 3))
    data = [(torch.rand(4, 1, 10, 10, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0]))]
    curves.masking_curve(model, data, percentages=[0, 10, 20, 30, 40, 50, 60], fill="road")
    assert calls == [12, 12], calls  # 6 levels that remove pixels, 3 per solve of 4 images each
    assert solves == calls, solves
