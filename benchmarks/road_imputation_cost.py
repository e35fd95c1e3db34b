"""ROAD imputation cost: the package's batched solver against the reference, side by side.

Workload: the masks a MoRF curve makes, the top p% of a random saliency map per image,
p = 10, 30, 50, 70, 90, on random images of each size, for three families of map (``--families``):
``smooth`` (blurred at size/16: clustered holes, as gradient saliency gives), ``pixel`` (i.i.d.
noise: scattered single-pixel holes, as a raw, noisy gradient gives) and ``blurred`` (blurred at
size/4: a few large holes, as a blurred map gives).
The reference (``benchmarks/road_reference.py``, ROAD's scipy ``spsolve`` per image) runs on a
subset of the same images and masks, and so does the other way to make the solve independent of
the hole size, a sparse direct factorization per image with vectorised assembly
(``benchmarks/road_direct.py``); all are timed in the same process, alternately, and the largest
absolute difference from the reference (noise off) is printed beside the speed, with the number
of preconditioned CG iterations per removal level (the multigrid claim: flat in the hole size). Then the
masking curve of the paper's CNN on Fashion-MNIST-sized images under ROAD against the mean fill, and
(``--curve-sizes``) the same for a timm ResNet-18 at the sizes users work at. ``--values-per-solve``
instead times the solver alone against the number of pixel values it solves at once
(``sd_plugin.evaluation.imputation.VALUES_PER_SOLVE``: the CPU's working set), interleaved.

    python benchmarks/road_imputation_cost.py --output benchmarks/results/road-imputation-cpu.json
    python benchmarks/road_imputation_cost.py --values-per-solve 262144 1048576 4194304 16777216 \
        --sizes 28 64 224 --images 640 160 32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from road_direct import direct_impute_batch
from road_reference import reference_impute_batch
from torch.utils.data import DataLoader, TensorDataset

import sd_plugin.evaluation.imputation as imputation
from sd_plugin.evaluation.attribution import blur_maps
from sd_plugin.evaluation.imputation import noisy_linear_impute
from sd_plugin.evaluation.masking_curve import masking_curve, pixel_ranks
from sd_plugin.evaluation.multigrid import VCycle

LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)

MASK_FAMILIES = {"smooth": 16, "pixel": None, "blurred": 4}  # blur sigma = size / value (None: no blur)


def morf_masks(count: int, size: int, generator: torch.Generator, family: str = "smooth") -> torch.Tensor:
    maps = torch.rand(count, size, size, generator=generator)
    if MASK_FAMILIES[family] is not None:
        maps = blur_maps(maps, max(1.0, size / MASK_FAMILIES[family]))
    ranks = pixel_ranks(maps).view(count, size, size)
    levels = torch.tensor(LEVELS).repeat(count // 5 + 1)[:count].view(count, 1, 1)
    return ranks < (levels * size * size).round()


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def iterations_per_level(images: torch.Tensor, masks: torch.Tensor) -> list[int]:
    """Preconditioned CG iterations (V-cycles, both refinement stages) of one solve of each level's images."""
    calls = [0]
    original, values_per_solve = VCycle.__call__, imputation.VALUES_PER_SOLVE

    def counted(self, residual):
        calls[0] += 1
        return original(self, residual)

    VCycle.__call__ = counted
    imputation.VALUES_PER_SOLVE = sys.maxsize  # one solve per level, not chunks
    try:
        counts = []
        for level in range(len(LEVELS)):
            calls[0] = 0
            noisy_linear_impute(images[level :: len(LEVELS)], masks[level :: len(LEVELS)], noise=0.0)
            counts.append(calls[0])
        return counts
    finally:
        VCycle.__call__ = original
        imputation.VALUES_PER_SOLVE = values_per_solve


def values_per_solve_table(sizes: list[int], counts: list[int], caps: list[int], rounds: int = 4) -> list[dict]:
    """Solver seconds per image against ``VALUES_PER_SOLVE``, the caps interleaved within each round."""
    generator = torch.Generator().manual_seed(0)
    default, rows = imputation.VALUES_PER_SOLVE, []
    for size, count in zip(sizes, counts, strict=True):
        images = torch.rand(count, 3, size, size, generator=generator)
        masks = morf_masks(count, size, generator, "smooth")
        times = {cap: [] for cap in caps}
        try:
            for _ in range(rounds + 1):  # the first round warms up
                for cap in caps:
                    imputation.VALUES_PER_SOLVE = cap
                    start = time.perf_counter()
                    noisy_linear_impute(images, masks, noise=0.0)
                    times[cap].append(time.perf_counter() - start)
        finally:
            imputation.VALUES_PER_SOLVE = default
        per_image = {cap: 1e3 * min(values[1:]) / count for cap, values in times.items()}
        rows.append(dict(size=size, images=count, ms_per_image=per_image))
    return rows


def curve_seconds(model, data, device: str, repeats: int = 2) -> dict[str, list[float]]:
    """Masking-curve seconds under the mean fill and ROAD, interleaved."""
    times: dict[str, list[float]] = {}
    for fill in ("mean", "road") * repeats:
        start = time.perf_counter()
        masking_curve(model, data, fill=fill, device=device)
        times.setdefault(fill, []).append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    parser.add_argument("--images", type=int, nargs="+", default=[100], help="images per size (one, or one per size)")
    parser.add_argument("--reference-images", type=int, default=20, help="images per size for the reference")
    parser.add_argument("--families", nargs="+", default=["smooth"], choices=sorted(MASK_FAMILIES))
    parser.add_argument("--device", default="cpu", help="where the package's solver runs (the reference: CPU)")
    parser.add_argument("--curve-sizes", type=int, nargs="*", default=[], help="ResNet-18 curves at these sizes")
    parser.add_argument("--curve-images", type=int, default=16, help="images per ResNet-18 curve")
    parser.add_argument("--values-per-solve", type=int, nargs="+", default=None,
                        help="only time the solver against these VALUES_PER_SOLVE caps")  # fmt: skip
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    counts = args.images * len(args.sizes) if len(args.images) == 1 else args.images
    if len(counts) != len(args.sizes):
        parser.error(f"--images needs one count or one per size ({len(args.sizes)}), got {len(args.images)}.")
    if args.values_per_solve:
        table = values_per_solve_table(args.sizes, counts, args.values_per_solve)
        print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("| size px | images | " + " | ".join(f"{cap} values: ms/img" for cap in args.values_per_solve) + " |")
        print("|---|---|" + "---|" * len(args.values_per_solve))
        for row in table:
            cells = " | ".join(f"{row['ms_per_image'][cap]:.2f}" for cap in args.values_per_solve)
            print(f"| {row['size']} | {row['images']} | {cells} |")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            result = dict(command="python " + " ".join(sys.argv), values_per_solve=table)
            Path(args.output).write_text(json.dumps(result, indent=2))
        return 0
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rows = []
    work = [(family, pair) for family in args.families for pair in zip(args.sizes, counts, strict=True)]
    for family, (size, count) in work:
        images = torch.rand(count, 3, size, size, generator=generator)
        masks = morf_masks(count, size, generator, family)
        subset = slice(0, args.reference_images)
        device_images, device_masks = images.to(args.device), masks.to(args.device)

        def solve(x=device_images, m=device_masks):
            noisy_linear_impute(x, m, noise=0.0)
            if x.device.type == "cuda":
                torch.cuda.synchronize()

        ours = noisy_linear_impute(device_images, device_masks, noise=0.0).cpu()
        reference = reference_impute_batch(images[subset], masks[subset])
        error = float((ours[subset].double() - reference).abs().max())
        direct_error = float((direct_impute_batch(images[subset], masks[subset]).double() - reference).abs().max())
        t_ours = best_of(3, solve) / count
        reference_work = (images[subset], masks[subset])
        t_ref = best_of(2, lambda work=reference_work: reference_impute_batch(*work)) / args.reference_images
        t_direct = best_of(2, lambda work=reference_work: direct_impute_batch(*work)) / args.reference_images
        rows.append(
            dict(
                family=family,
                size=size,
                ours_images_per_s=1 / t_ours,
                reference_images_per_s=1 / t_ref,
                ratio=t_ref / t_ours,
                max_abs_difference=error,
                direct_images_per_s=1 / t_direct,
                direct_ratio=t_ref / t_direct,
                direct_max_abs_difference=direct_error,
                iterations_per_level=dict(
                    zip(map(str, LEVELS), iterations_per_level(device_images, device_masks), strict=True)
                ),
            )  # fmt: skip
        )
    # masking curve: ROAD vs mean fill, same model and images
    from sd_plugin.core.models import PaperCNN

    model = PaperCNN().eval().to(args.device)
    data = DataLoader(
        TensorDataset(
            torch.randn(256, 1, 28, 28, generator=generator), torch.randint(0, 10, (256,), generator=generator)
        ),
        batch_size=64,
    )
    curve_times = curve_seconds(model, data, args.device)
    curve_ratio = min(curve_times["road"]) / min(curve_times["mean"])
    resnet_curves = []
    for size in args.curve_sizes:
        import timm

        resnet = timm.create_model("resnet18", pretrained=False, num_classes=10).eval().to(args.device)
        images = torch.rand(args.curve_images, 3, size, size, generator=generator)
        labels = torch.randint(0, 10, (args.curve_images,), generator=generator)
        times = curve_seconds(resnet, DataLoader(TensorDataset(images, labels), batch_size=16), args.device)
        resnet_curves.append(dict(size=size, images=args.curve_images, seconds=times,
                                  ratio=min(times["road"]) / min(times["mean"])))  # fmt: skip
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.device != "cpu":
        machine += f", solver on {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}"
    print(f"machine: {machine}")
    print(
        "| masks | size px | ours img/s | reference img/s | ours / reference | max abs diff | "
        "direct LU / reference | CG iterations at 10/30/50/70/90% |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        iterations = "/".join(str(count) for count in row["iterations_per_level"].values())
        print(
            f"| {row['family']} | {row['size']} | {row['ours_images_per_s']:.1f} | "
            f"{row['reference_images_per_s']:.1f} | "
            f"{row['ratio']:.1f}x | {row['max_abs_difference']:.1e} | {row['direct_ratio']:.1f}x | {iterations} |"
        )
    print(
        f"masking curve (paper CNN, 256 images 28 px, 21 levels): mean fill {min(curve_times['mean']):.2f} s, "
        f"ROAD {min(curve_times['road']):.2f} s, ratio {curve_ratio:.2f}x"
    )
    for row in resnet_curves:
        print(
            f"masking curve (timm ResNet-18, random weights, {row['images']} images {row['size']} px, 21 levels): "
            f"mean fill {min(row['seconds']['mean']):.2f} s, ROAD {min(row['seconds']['road']):.2f} s, "
            f"ratio {row['ratio']:.2f}x"
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        result = dict(machine=machine, command="python " + " ".join(sys.argv), imputation=rows,
                      masking_curve_seconds=curve_times, masking_curve_ratio=curve_ratio,
                      resnet18_masking_curves=resnet_curves)  # fmt: skip
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
