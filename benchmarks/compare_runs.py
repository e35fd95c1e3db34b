"""Per-seed paired comparison of runs between two ``reproduce.py`` / ``finetune.py`` result folders.

For a change that should move no result (for example the default whitening, eigh → Cholesky):
the same method, the same seeds, trained before and after, compared seed by seed.

    python benchmarks/compare_runs.py benchmarks/results/reproduce-fashion-mnist-quick-controls \\
        benchmarks/results/reproduce-fashion-mnist-quick-cheaper-masking --method saliencydecor

With ``--after-method``, two methods of two folders: for example a baseline trained for fewer
epochs against SGT, at matched accuracy. Localization columns are compared where both have them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reproduce import paired_runs

KEYS = (
    ("accuracy", "accuracy"),
    ("faithfulness_gap", "mean-fill gap"),
    ("road_lerf_morf_gap", "ROAD LeRF−MoRF"),
    ("deletion_auc", "deletion"),
    ("insertion_auc", "insertion"),
    ("live_features", "live fraction"),
    ("relevance_mass", "relevance mass"),
    ("relevance_rank", "relevance rank"),
    ("pointing_game", "pointing game"),
)


def runs_of(folder: str, method: str) -> list[dict]:
    results = json.loads((Path(folder) / "results.json").read_text())
    entries = {**results.get("main", {}), **results.get("variants", {})}
    if method not in entries:
        raise SystemExit(f"{folder}: no runs of {method!r} (it has {sorted(entries)}).")
    return entries[method]["runs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="result folder of the earlier runs")
    parser.add_argument("after", help="result folder of the later runs")
    parser.add_argument("--method", default="saliencydecor", help="method (or variant) to compare")
    parser.add_argument("--after-method", default=None, help="the after folder's method (default: --method)")
    args = parser.parse_args(argv)
    after_method = args.after_method or args.method
    before, after = runs_of(args.before, args.method), runs_of(args.after, after_method)
    print(f"{after_method} of {args.after} against {args.method} of {args.before}, per seed")
    for key, label in KEYS:
        test = paired_runs("after", after, "before", before, key)
        if test:
            print(f"- {label}: {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
