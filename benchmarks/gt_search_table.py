"""The ground-truth search table (RESULTS.md §S): every run against the baseline and the random-mask control.

Reads the ``results.json`` of ``benchmarks/finetune.py`` folders (``benchmarks/gt_search.sh``) and prints,
per run, mean ± std over seeds of accuracy, relevance mass, pointing game, ROAD LeRF−MoRF and
insertion, then the paired differences (same seed: same initialisation, data order and test images)
to the baseline and to the control: per-seed mean ± std with the paired t (3 seeds: |t| > 4.30 for
5%), and for relevance mass the per-image paired t pooled over seeds.

    python benchmarks/gt_search_table.py benchmarks/results/gt-search-blocks32-cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BASELINE = {"method": "baseline"}
CONTROL = {"method": "sgt", "mask_selection": "random"}
COLUMNS = (
    ("accuracy", "accuracy %", "{:.1f}"),
    ("relevance_mass", "relevance mass ↑", "{:.3f}"),
    ("pointing_game", "pointing game ↑", "{:.3f}"),
    ("road_lerf_morf_gap", "ROAD LeRF−MoRF ↑", "{:.3f}"),
    ("insertion_auc", "insertion ↑", "{:.3f}"),
)
T_CRITICAL = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78}  # two-sided 5%, by degrees of freedom


def load_runs(folders: list[str]) -> dict[str, dict[int, dict]]:
    """``{config json: {seed: metrics}}`` over the folders' finished runs (later folders win)."""
    runs: dict[str, dict[int, dict]] = {}
    for folder in folders:
        finished = json.loads((Path(folder) / "results.json").read_text()).get("finished", {})
        for key, metrics in finished.items():
            config, _, seed = key.rpartition(" seed=")
            runs.setdefault(config, {})[int(seed)] = metrics
    return runs


def name_of(config: str) -> str:
    settings = json.loads(config)
    method = settings.pop("method")
    settings.pop("group_size", None)
    return method + (":" + ",".join(f"{k}={v}" for k, v in settings.items()) if settings else "")


def paired_t(differences: list[float]) -> float:
    if len(differences) < 2:
        return float("nan")
    spread = statistics.stdev(differences)
    return statistics.mean(differences) / (spread / len(differences) ** 0.5) if spread > 0 else float("inf")


def compare(run: dict[int, dict], reference: dict[int, dict], key: str) -> tuple[str, bool | None]:
    seeds = sorted(set(run) & set(reference))
    differences = [run[s][key] - reference[s][key] for s in seeds]
    if len(differences) < 2:
        return "–", None
    t = paired_t(differences)
    significant = abs(t) > T_CRITICAL.get(len(differences) - 1, 2.0)
    mean, std = statistics.mean(differences), statistics.stdev(differences)
    return f"{mean:+.3f} ± {std:.3f} (t = {t:.1f}{', sig.' if significant else ''})", significant and mean > 0


def per_image_t(run: dict[int, dict], reference: dict[int, dict], key: str) -> str:
    differences = []
    for seed in sorted(set(run) & set(reference)):
        mine, theirs = run[seed]["per_image"].get(key), reference[seed]["per_image"].get(key)
        if mine and theirs:
            differences += [a - b for a, b in zip(mine, theirs, strict=True) if a == a and b == b]
    return f"{paired_t(differences):.1f} (n = {len(differences)})" if len(differences) > 2 else "–"


def table(runs: dict[str, dict[int, dict]]) -> list[str]:
    header = "| run | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " | train s |"
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for config, by_seed in runs.items():
        cells = []
        for key, _, fmt in COLUMNS:
            values = [m[key] for m in by_seed.values() if key in m]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{fmt.format(statistics.mean(values))} ± {fmt.format(std)}")
        seconds = statistics.mean(m["train_seconds"] for m in by_seed.values())
        lines.append(f"| {name_of(config)} | {len(by_seed)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return lines


def comparisons(runs: dict[str, dict[int, dict]]) -> list[str]:
    baseline, control = runs.get(json.dumps(BASELINE)), None
    for config, by_seed in runs.items():
        if {k: v for k, v in json.loads(config).items() if k != "group_size"} == CONTROL:
            control = by_seed
    for config in runs:
        if {k: v for k, v in json.loads(config).items() if k != "group_size"} == BASELINE:
            baseline = runs[config]
    lines = [
        "| run | Δ relevance mass vs baseline | per-image t | Δ vs control | per-image t | Δ pointing vs baseline "
        "| Δ ROAD LeRF−MoRF vs baseline | Δ accuracy vs baseline | beats both on mass? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config, by_seed in runs.items():
        if by_seed is baseline:
            continue
        mass_base, better_base = compare(by_seed, baseline, "relevance_mass") if baseline else ("–", None)
        mass_control, better_control = (
            compare(by_seed, control, "relevance_mass") if control and by_seed is not control else ("–", None)
        )
        verdict = "yes" if better_base and better_control else "no"
        lines.append(
            f"| {name_of(config)} | {mass_base} | {per_image_t(by_seed, baseline, 'relevance_mass')} | {mass_control} "
            f"| {per_image_t(by_seed, control, 'relevance_mass') if control and by_seed is not control else '–'} "
            f"| {compare(by_seed, baseline, 'pointing_game')[0]} "
            f"| {compare(by_seed, baseline, 'road_lerf_morf_gap')[0]} "
            f"| {compare(by_seed, baseline, 'accuracy')[0]} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="benchmarks/finetune.py output folders of one setup")
    args = parser.parse_args(argv)
    runs = load_runs(args.folders)
    print("\n".join(table(runs)))
    print()
    print("\n".join(comparisons(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
