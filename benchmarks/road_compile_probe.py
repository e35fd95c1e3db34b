"""Does ``torch.compile`` make ROAD's V-cycle faster on this CPU? A probe, timed against the package's.

The package's ``VCycle`` writes into views (``out=``), which ``torch.compile(fullgraph=True)``
refuses, so the probe builds the same cycle from out-of-place operations (checked equal to the
package's to float32 round-off) and times three things in one process on the same residual: the
package's eager cycle, the out-of-place cycle eager, and the out-of-place cycle compiled (inductor,
fixed shapes), with the compile time. The masks are the benchmark's smooth MoRF masks.

    python benchmarks/road_compile_probe.py --size 64 --images 40
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from road_imputation_cost import morf_masks
from torch import Tensor

import sd_plugin.evaluation.imputation as imputation
from sd_plugin.evaluation.multigrid import OFFSETS, VCycle, from_padded_flat, interior, to_padded_flat


def road_apply(values: Tensor, diagonal: Tensor, scale: Tensor, height: int, width: int) -> Tensor:
    """``_RoadOperator.__call__`` out of place."""
    stride, inside = width + 2, interior(height, width)
    rows = values[..., :-2] + 2 * values[..., 1:-1] + values[..., 2:]
    start, stop = inside.start - 1, inside.stop - 1
    above, below = rows[..., start - stride : stop - stride], rows[..., start + stride : stop + stride]
    both = above + 2 * rows[..., start:stop] + below
    segment = diagonal[..., inside] * values[..., inside] - scale[..., inside] * both
    return F.pad(segment, (inside.start, values.shape[-1] - inside.stop))


def stencil_apply(values: Tensor, flat: Tensor, height: int, width: int) -> Tensor:
    """``Stencil.apply`` out of place."""
    stride, inside = width + 2, interior(height, width)
    total = 0
    for k, (dy, dx) in enumerate(OFFSETS):
        offset = dy * stride + dx
        total = total + flat[:, k : k + 1, inside] * values[..., inside.start + offset : inside.stop + offset]
    return F.pad(total, (inside.start, values.shape[-1] - inside.stop))


def restrict(values: Tensor, fine: tuple[int, int], coarse: tuple[int, int]) -> Tensor:
    (height, width), (coarse_height, coarse_width) = fine, coarse
    planes = values.view(*values.shape[:-1], height + 2, width + 2)
    planes = F.pad(planes, (0, 2 * coarse_width + 1 - (width + 2), 0, 2 * coarse_height + 1 - (height + 2)))
    rows = 0.5 * planes[..., 0 : 2 * coarse_height - 1 : 2, :] + planes[..., 1 : 2 * coarse_height : 2, :]
    rows = rows + 0.5 * planes[..., 2 : 2 * coarse_height + 1 : 2, :]
    both = 0.5 * rows[..., 0 : 2 * coarse_width - 1 : 2] + rows[..., 1 : 2 * coarse_width : 2]
    return to_padded_flat(both + 0.5 * rows[..., 2 : 2 * coarse_width + 1 : 2])


def prolong(values: Tensor, coarse: tuple[int, int], fine: tuple[int, int]) -> Tensor:
    (coarse_height, coarse_width), (height, width) = coarse, fine
    planes = from_padded_flat(values, coarse_height, coarse_width)
    odd = F.pad(0.5 * (planes[..., :-1, :] + planes[..., 1:, :]), (0, 0, 0, 1))
    rows = torch.stack([planes, odd], dim=-2).flatten(-3, -2)[..., :height, :]
    odd = F.pad(0.5 * (rows[..., :-1] + rows[..., 1:]), (0, 1))
    return to_padded_flat(torch.stack([rows, odd], dim=-1).flatten(-2)[..., :width])


def out_of_place_cycle(cycle: VCycle, operator) -> Callable[[Tensor], Tensor]:
    """``cycle`` (ROAD's fine operator ``operator`` on top) as out-of-place operations only."""
    sizes = [(level.height, level.width) for level in cycle.levels]

    def run(index: int, residual: Tensor) -> Tensor:
        if index == len(sizes) - 1:
            planes = from_padded_flat(residual, *sizes[index])
            solved = (cycle.coarse_inverse @ planes.reshape(*planes.shape[:-2], -1, 1)).view(planes.shape)
            return to_padded_flat(solved)
        if index == 0:
            apply = lambda v: road_apply(v, operator.diagonal, operator.scale, *sizes[0])  # noqa: E731
        else:
            apply = lambda v: stencil_apply(v, cycle.levels[index]._flat, *sizes[index])  # noqa: E731
        smoother = cycle.smoothers[index]
        solution = smoother * residual
        correction = run(index + 1, restrict(residual - apply(solution), sizes[index], sizes[index + 1]))
        solution = solution + prolong(correction, sizes[index + 1], sizes[index]) * cycle.active[index]
        return solution + smoother * (residual - apply(solution))

    return lambda residual: run(0, residual)


def per_image_ms(function, residual: Tensor, images: int, repeats: int = 20) -> float:
    for _ in range(3):
        function(residual)
    start = time.perf_counter()
    for _ in range(repeats):
        function(residual)
    return 1e3 * (time.perf_counter() - start) / repeats / images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    masks = morf_masks(args.images, args.size, generator, "smooth")
    missing = masks.float().unsqueeze(1)
    operator = imputation._RoadOperator(missing, imputation._neighbour_sum(torch.ones_like(missing[:1])))
    cycle = VCycle(operator.stencil(), fine_apply=operator)
    residual = to_padded_flat(torch.rand(args.images, 3, args.size, args.size, generator=generator) * missing)
    functional = out_of_place_cycle(cycle, operator)
    expected = cycle(residual)
    scale = float(expected.abs().max())
    eager_difference = float((functional(residual) - expected).abs().max()) / scale
    start = time.perf_counter()
    compiled = torch.compile(functional, fullgraph=True, dynamic=False)
    compiled_difference = float((compiled(residual) - expected).abs().max()) / scale
    compile_seconds = time.perf_counter() - start
    rows = [
        ("package VCycle, eager", per_image_ms(cycle, residual, args.images), 0.0),
        ("out-of-place cycle, eager", per_image_ms(functional, residual, args.images), eager_difference),
        ("out-of-place cycle, torch.compile", per_image_ms(compiled, residual, args.images), compiled_difference),
    ]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.images} images, {args.size} px, levels {[level.height for level in cycle.levels]}; "
          f"compile {compile_seconds:.0f} s")  # fmt: skip
    print("| V-cycle | ms per image per cycle | max difference / max |")
    print("|---|---|---|")
    for name, milliseconds, difference in rows:
        print(f"| {name} | {milliseconds:.3f} | {difference:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
