"""Live penultimate features on scikit-learn's digits, per seed: does any method lose features the baseline keeps?

The paper's CNN trained as in ``tests/test_collapse.py`` (SGD momentum 0.9, lr 0.01, batch 128, 15
epochs) for each seed, with the baseline, ``decor`` and ``saliencydecor`` under both loss-only
whitenings; prints live features of 392 per run (~4 s a run on 2 CPU cores).

    python benchmarks/collapse_digits_seeds.py --seeds 0 1 2 3 4 5 6 7 8 9 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_collapse import _train_digits  # noqa: E402

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
        live = [_train_digits(method, seed, **kw)[1] for method, kw in RUNS]
        print(f"| {seed} | " + " | ".join(str(n) for n in live) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
