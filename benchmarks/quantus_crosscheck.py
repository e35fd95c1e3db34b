"""Cross-check the package's metrics against Quantus 0.6.0 on the same maps, masks and model.

Needs Quantus beside the package (``pip install quantus==0.6.0``; not a dependency). Compares,
image by image, on one small CNN and one seeded batch of digits-sized images:

- relevance mass accuracy, relevance rank accuracy, pointing game (ours:
  ``sd_plugin.evaluation.localization``) against ``quantus.RelevanceMassAccuracy``,
  ``quantus.RelevanceRankAccuracy`` and ``quantus.PointingGame`` with their defaults;
- the Gini sparseness (``sd_plugin.evaluation.sparseness``, which is Quantus's ``Sparseness``
  times ``n / (n - 1)``) against ``quantus.Sparseness``;
- the randomization check's Spearman (``sd_plugin.evaluation.randomization.spearman``) against
  ``scipy.stats.spearmanr`` on tied maps (Quantus's MPRT uses scipy's).

    python benchmarks/quantus_crosscheck.py --output benchmarks/results/quantus-crosscheck/results.json

Prints one line per metric: the largest absolute difference over the images, and exits 1 when a
difference exceeds 1e-6 (Quantus computes in float32; NaN where both give NaN counts as equal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def max_difference(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    both_nan = np.isnan(ours) & np.isnan(theirs)
    if (np.isnan(ours) != np.isnan(theirs)).any():
        return float("inf")
    return float(np.abs(ours[~both_nan] - theirs[~both_nan]).max()) if (~both_nan).any() else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    import quantus
    from scipy.stats import spearmanr

    from sd_plugin.evaluation.attribution import saliency_maps
    from sd_plugin.evaluation.localization import pointing_game, relevance_mass, relevance_rank
    from sd_plugin.evaluation.randomization import spearman
    from sd_plugin.evaluation.sparseness import sparseness

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10)
    ).eval()
    images = torch.randn(args.images, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    maps = saliency_maps(model, images, labels)  # (N, 16, 16), >= 0
    masks = torch.zeros(args.images, 16, 16, dtype=torch.bool)
    for i in range(args.images):  # a box per image, of varying size and place
        size = 2 + i % 9
        top, left = (int(v) for v in torch.randint(0, 16 - size + 1, (2,), generator=generator))
        masks[i, top : top + size, left : left + size] = True
    masks[-1] = False  # one empty mask: NaN in both
    x, y = images.numpy(), labels.numpy()
    a, s = maps.unsqueeze(1).numpy(), masks.unsqueeze(1).numpy().astype(np.float32)
    common = dict(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu")
    rows = {}
    quiet = dict(disable_warnings=True, display_progressbar=False)
    rows["relevance_mass"] = max_difference(
        relevance_mass(maps, masks), quantus.RelevanceMassAccuracy(**quiet)(**common)
    )
    rows["relevance_rank"] = max_difference(
        relevance_rank(maps, masks), quantus.RelevanceRankAccuracy(**quiet)(**common)
    )
    # Quantus writes NaN into a boolean array for an empty mask, which turns it into a hit (1.0); ours
    # gives NaN as its docstring (and the other two metrics) say: compare on the non-empty masks
    theirs_pointing = np.asarray(quantus.PointingGame(**quiet)(**common), dtype=np.float64)
    rows["pointing_game"] = max_difference(pointing_game(maps, masks)[:-1], theirs_pointing[:-1])
    empty_mask_pointing = {"ours": float(pointing_game(maps, masks)[-1]), "quantus": float(theirs_pointing[-1])}
    n = maps[0].numel()
    theirs = np.asarray(quantus.Sparseness(**quiet)(**{**common, "s_batch": None})) * n / (n - 1)
    rows["sparseness"] = max_difference(sparseness(maps), theirs)
    tied_a = (maps * 4).round().flatten(1).double()  # many ties
    tied_b = (torch.rand(maps.shape, generator=generator) * 3).round().flatten(1).double()
    expected = [spearmanr(tied_a[i].numpy(), tied_b[i].numpy()).statistic for i in range(args.images)]
    rows["spearman (scipy, ties)"] = max_difference(spearman(tied_a, tied_b), expected)
    for name, difference in rows.items():
        print(f"{name}: max |ours - reference| = {difference:.2e} over {args.images} images")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "quantus": quantus.__version__,
            "torch": torch.__version__,
            "images": args.images,
            "command": "python " + " ".join(sys.argv),
            "max_abs_difference": rows,
            "pointing_game_on_an_empty_mask": empty_mask_pointing,
        }
        Path(args.output).write_text(json.dumps(record, indent=2))
    print(
        f"pointing game on an empty mask: ours {empty_mask_pointing['ours']}, quantus {empty_mask_pointing['quantus']}"
    )
    return 0 if all(value <= 1e-6 for value in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
