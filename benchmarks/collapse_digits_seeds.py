"""Live penultimate features on scikit-learn's digits, per seed: does any method lose features the baseline keeps?

The paper's CNN trained as in ``tests/test_collapse.py`` (SGD momentum 0.9, lr 0.01, batch 128, 15
epochs) for each seed, with the baseline, ``decor`` and ``saliencydecor`` under both loss-only
whitenings; prints live features of 392 per run (~4 s a run on 2 CPU cores).

    python benchmarks/collapse_digits_seeds.py --seeds 0 1 2 3 4 5 6 7 8 9 10
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep
from sd_plugin.core.adapter import adapt
from sd_plugin.core.collapse import live_feature_fraction
from sd_plugin.core.models import PaperCNN
from sd_plugin.evaluation.report import accuracy, collect_features
from sd_plugin.storage.builtin_datasets import load_digits_splits


def train_digits(method: str, seed: int, **method_args) -> tuple[float, int]:
    """Paper CNN on digits (SGD momentum 0.9, lr 0.01, batch 128, 15 epochs): (test accuracy, live features)."""
    train, test = load_digits_splits(image_size=28)
    torch.manual_seed(seed)
    model = PaperCNN.mnist()
    objective = SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method=method, group_size=8, **method_args))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    order = torch.Generator().manual_seed(seed)
    for _ in range(15):
        for batch in DataLoader(train, batch_size=128, shuffle=True, drop_last=True, generator=order):
            objective.step(model, batch["pixel_values"], batch["labels"])
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    loader = DataLoader(test, batch_size=500)
    features = collect_features(model, loader)
    live = round(float(live_feature_fraction(features)) * features.shape[1])
    return accuracy(model, loader), live


RUNS = (
    ("baseline", {}),
    ("decor", {}),
    ("decor", {"whitening_method": "eigh"}),
    ("saliencydecor", {}),
    ("saliencydecor", {"whitening_method": "eigh"}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(11)))
    args = parser.parse_args(argv)
    names = [f"{method} ({kw.get('whitening_method', 'auto')})" for method, kw in RUNS]
    print("| seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for seed in args.seeds:
        live = [train_digits(method, seed, **kw)[1] for method, kw in RUNS]
        print(f"| {seed} | " + " | ".join(str(n) for n in live) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
