"""What ``evaluate`` costs per 100 images, with each saliency map computed once or per metric.

``evaluate_model`` (what ``python -m sd_plugin evaluate`` runs) scores removal curves under the mean
fill and ROAD, RISE deletion / insertion, the blurred-map control of each, sparseness and (on a
localization set) relevance mass. With ``reuse_maps=True`` (the default) every metric reads one
pass of maps per target; ``False`` recomputes them per metric, as before issue 29. Both run in one
process, alternately, on the same model and images; the table reports seconds per 100 images and
the ratio, best of ``--repeats``, and the share of the reused run's time spent in ROAD's imputation.

    python benchmarks/evaluate_cost.py --output benchmarks/results/evaluate-cost-cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
from common import machine_description
from torch.utils.data import TensorDataset

from sd_plugin.evaluation.masking_curve import percentages_every
from sd_plugin.evaluation.report import evaluate_model


def timed(model, data, reuse: bool, step: float, road_seconds: list[float] | None = None) -> float:
    """Seconds of one ``evaluate_model``; the time inside ROAD's imputation is appended to ``road_seconds``."""
    curves = importlib.import_module("sd_plugin.evaluation.masking_curve")
    impute, inside = curves.noisy_linear_impute, [0.0]

    def timed_impute(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return impute(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - begin

    curves.noisy_linear_impute = timed_impute
    start = time.perf_counter()
    try:
        evaluate_model(
            model,
            data,
            batch_size=50,
            percentages=percentages_every(step),
            sparseness_images=len(data),
            reuse_maps=reuse,
            feature_layer="global_pool",
        )
    finally:
        curves.noisy_linear_impute = impute
    if road_seconds is not None:
        road_seconds.append(inside[0])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="timm architecture (random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--images", type=int, nargs="+", default=[100, 20], help="images per size")
    parser.add_argument("--step", type=float, default=10.0, help="removal-curve step in percent")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if len(args.images) != len(args.sizes):
        parser.error(f"--images needs one count per size ({len(args.sizes)}), got {len(args.images)}.")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).eval()
    rows = []
    for size, count in zip(args.sizes, args.images, strict=True):
        data = TensorDataset(torch.randn(count, 3, size, size), torch.randint(0, 10, (count,)))
        seconds, road = {False: [], True: []}, {False: [], True: []}
        for _ in range(args.repeats):
            for reuse in (False, True):
                seconds[reuse].append(timed(model, data, reuse, args.step, road[reuse]))
        before, after = min(seconds[False]), min(seconds[True])
        fastest = seconds[True].index(after)
        rows.append(
            {
                "size": size,
                "images": count,
                "per_metric_s_per_100": 100 * before / count,
                "once_s_per_100": 100 * after / count,
                "ratio": before / after,
                "road_share": road[True][fastest] / after,
            }
        )
    print(f"Machine: {machine_description(torch.device('cpu'))}; {args.model}, random weights, step {args.step}%")
    print("| size | images | maps per metric, s / 100 images | maps once, s / 100 images | speed-up | ROAD's share |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size']} | {row['images']} | {row['per_metric_s_per_100']:.1f} | {row['once_s_per_100']:.1f} "
            f"| {row['ratio']:.2f}× | {100 * row['road_share']:.0f}% |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": machine_description(torch.device("cpu")), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
