"""Cost of the batched masking curve relative to one plain evaluation pass.

Same model and data, side by side in one run: a plain ``no_grad`` evaluation pass, the
batched ``masking_curve`` (saliency order, ``len(percentages)`` levels), and a naive
per-image loop (one forward per image and level, as per-image attribution libraries do)
on a subset. Target (issue 3): masking curve <= (levels + 2) x the plain pass.

    python benchmarks/masking_curve_cost.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine_description, median_seconds
from torch.utils.data import DataLoader, TensorDataset

from sd_plugin.evaluation import masking_curve
from sd_plugin.evaluation.masking_curve import DEFAULT_PERCENTAGES


def build_model(name: str, device: torch.device) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    import timm

    if name == "resnet18":
        return timm.create_model("resnet18", pretrained=False, num_classes=10).to(device).eval(), (3, 32, 32)
    from sd_plugin.core.models import PaperCNN

    return PaperCNN.mnist().to(device).eval(), (1, 28, 28)


def naive_curve(model, images, labels, percentages) -> None:
    for x, y in zip(images, labels, strict=True):
        x = x.unsqueeze(0).clone().requires_grad_(True)
        logits = model(x)
        logits = logits["logits"] if isinstance(logits, dict) else logits
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y.view(1)), x)
        order = grad.abs().mean(1).flatten().argsort(descending=True)
        mean = x.detach().mean((2, 3), keepdim=True)
        for p in percentages:
            masked = x.detach().clone().flatten(2)
            chosen = order[: int(round(p / 100 * order.numel()))]
            masked[:, :, chosen] = mean.flatten(2).expand_as(masked)[:, :, chosen]
            with torch.no_grad():
                model(masked.view_as(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    parser.add_argument("--max-batch-size", type=int, default=None, help="images per masked forward")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images_count, batch_size, naive_count = (512, 128, 16) if args.quick else (4096, 256, 64)
    repeats = 3 if args.quick else 5
    percentages = DEFAULT_PERCENTAGES
    rows = []
    for name in ("paper-cnn", "resnet18"):
        torch.manual_seed(0)
        model, shape = build_model(name, device)
        data = TensorDataset(torch.randn(images_count, *shape), torch.randint(0, 10, (images_count,)))
        loader = DataLoader(data, batch_size=batch_size)
        batches = [(x.to(device), y.to(device)) for x, y in loader]

        def plain_pass(model=model, batches=batches):
            with torch.no_grad():
                for x, _ in batches:
                    model(x)

        plain = median_seconds(plain_pass, device, 1, repeats)
        batched = median_seconds(
            lambda model=model, batches=batches, args=args: masking_curve(
                model, batches, percentages, max_batch_size=args.max_batch_size
            ),
            device,
            1,
            repeats,
        )
        x0, y0 = batches[0][0][:naive_count], batches[0][1][:naive_count]
        naive = median_seconds(lambda model=model, x0=x0, y0=y0: naive_curve(model, x0, y0, percentages), device, 0, 1)
        naive_per_image = naive / naive_count
        batched_per_image = batched / images_count
        rows.append(
            {
                "model": name,
                "images": images_count,
                "levels": len(percentages),
                "plain_pass_s": plain,
                "masking_curve_s": batched,
                "ratio_to_plain": batched / plain,
                "target_ratio": len(percentages) + 2,
                "naive_per_image_ms": 1000 * naive_per_image,
                "batched_per_image_ms": 1000 * batched_per_image,
                "speedup_vs_naive": naive_per_image / batched_per_image,
            }
        )
    machine = machine_description(device)
    print(f"Machine: {machine}\n")
    print(
        "| model | images | levels | plain pass s | masking curve s | × plain (target) "
        "| naive ms/img | batched ms/img | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['images']} | {r['levels']} | {r['plain_pass_s']:.3f} | {r['masking_curve_s']:.3f} "
            f"| {r['ratio_to_plain']:.1f} (≤ {r['target_ratio']}) | {r['naive_per_image_ms']:.2f} "
            f"| {r['batched_per_image_ms']:.2f} | {r['speedup_vs_naive']:.1f}× |"
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
