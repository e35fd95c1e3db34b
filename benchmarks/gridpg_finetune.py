"""Ground truth where users work: the grid pointing game on natural photos, every explanation, every method.

Fine-tunes an ImageNet-pretrained model (by default EfficientNet-Lite0, ``python -m sd_plugin
convert-efficientnet-lite0 models/efficientnet_lite0``) on a labelled photo folder
(``benchmarks/natural_images.py``) with each training method, then scores the same fixed 2 × 2 grids
of test images (``sd_plugin.evaluation.grid_pointing_game``) under each explanation (loss gradient,
Input×Gradient, Grad-CAM, ...). It answers: which explanation of a plainly fine-tuned model
localizes best (the bar), and does a training method raise the *best* explanation's score, or only
the gradient's? Seeds are paired (same head initialisation and data order for every method), and
the grids are the same for every model, so differences are tested cell by cell.

    python benchmarks/gridpg_finetune.py --data data/clothing-small-128 --image-size 96 --epochs 2 \\
        --output-dir benchmarks/results/gridpg-clothing-96-cpu

Runs: ``baseline``, ``sgt``, ``saliencydecor``, ``control`` (SGT with random masks: the
explanation-agnostic control), ``adv:EPS`` (ℓ∞ adversarial training, k = 1, radius EPS in
normalised input units: with mean = std = 0.5, 8/255 of the pixel range is 0.063) and ``bcos:B``
(B-cosified, ``sd_plugin.core.bcos``; B raised from 1 over the first half of training, ``:now`` at
once; cross-entropy, ``:bce`` the papers' binary cross-entropy). The ``native`` explanation (a B-cos
model's contribution map) is scored for the B-cos runs only. ``energy:LAYER:WEIGHT`` trains with the
Energy loss (``input`` Input×Gradient or ``features`` Grad-CAM) on a localization set's masks;
``:shuffled`` / ``:centred`` are its controls. Any run takes schedule overrides after ``@``:
``bcos:2@lr=3e-4@epochs=6`` (a recipe search; the report pairs it with the baseline all the same).
``mosaic:P`` trains on ``sd_plugin.storage.grid_mosaics.GridMosaics``: a share P of the training
items become 2 × 2 mosaics of training images of distinct classes, with the target's cell as its
mask (guidance masks from labels alone); ``mosaic:P:other`` puts the mask on another class's cell
(its control). ``+`` joins a B-cos run, a mosaic run and an Energy-loss run into one:
``bcos:2+energy:features:5`` (the paper's best combination, guidance on a B-cos model),
``mosaic:0.5+energy:features:5`` (the Energy loss on the mosaics' cells).
``results.json`` keeps every run's per-cell scores (finished runs are not retrained);
``RESULTS.md`` has the table and the paired tests (``--report-only`` rewrites it from ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import commands_run
from finetune import DEFAULT_MODEL, load_model, load_splits, train_one
from torch.utils.data import DataLoader

from sd_plugin.core.bcos import is_bcos
from sd_plugin.evaluation.grid_pointing_game import grid_pointing_game, make_grids
from sd_plugin.evaluation.report import accuracy, finite_mean, localization_metrics
from sd_plugin.storage.grid_mosaics import GridMosaics

EXPLANATIONS = ("gradient", "input_x_gradient", "gradcam")
DEFAULT_RUNS = ("baseline", "sgt", "saliencydecor", "control", "adv:0.01", "adv:0.063")


SCHEDULE_KEYS = {"lr": "learning_rate", "epochs": "epochs"}


def run_schedule(run: str, hyper: dict) -> tuple[str, dict]:
    """``(method run name, hyper-parameters)`` of a run name with ``@lr=X`` / ``@epochs=N`` overrides.

    Example:
        >>> run_schedule("bcos:2@lr=3e-4@epochs=6", {"learning_rate": 1e-3, "epochs": 3})
        ('bcos:2', {'learning_rate': 0.0003, 'epochs': 6})
    """
    name, *overrides = run.split("@")
    hyper = dict(hyper)
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in SCHEDULE_KEYS or not value:
            raise SystemExit(f"run {run!r}: overrides are @lr=VALUE and @epochs=N, got {override!r}.")
        hyper[SCHEDULE_KEYS[key]] = int(value) if key == "epochs" else float(value)
    return name, hyper


def run_config(run: str, group_size: int, steps: int = 0) -> dict:
    """The Trainer's method fields of a run name (see the module docstring); ``steps``: the run's optimizer steps.

    Example:
        >>> run_config("bcos:2:now+energy:features:5", 16)["energy_weight"]
        5.0
    """
    if "+" in run:
        parts = run.split("+")
        kinds = [part.split(":")[0] for part in parts]
        if len(set(kinds)) != len(kinds) or not set(kinds) <= {"bcos", "energy", "mosaic"}:
            raise SystemExit(f"run {run!r}: '+' joins at most one each of bcos:B, mosaic:P and energy:LAYER:WEIGHT.")
        config: dict = {}
        for part in parts:
            config |= run_config(part, group_size, steps)
        return config
    if run.startswith("mosaic:"):  # the data changes (run_mosaic), the step is the plain one
        run_mosaic(run)
        return {"method": "baseline", "group_size": group_size}
    if run.startswith("bcos:"):  # bcos:B[:bce][:now]
        b, *options = run.removeprefix("bcos:").split(":")
        unknown = set(options) - {"bce", "now"}
        if unknown:
            raise SystemExit(f"run {run!r}: options are ':bce' (the papers' loss) and ':now' (no warm-up of B).")
        return {
            "method": "baseline",
            "group_size": group_size,
            "bcos_b": float(b),
            "bcos_warmup_steps": 0 if "now" in options else steps // 2,
            "classification_loss": "binary_cross_entropy" if "bce" in options else "cross_entropy",
        }
    if run.startswith("energy:"):  # energy:LAYER:WEIGHT[:shuffled|:centred]
        layer, weight, *control = run.removeprefix("energy:").split(":")
        return {
            "method": "baseline",
            "group_size": group_size,
            "energy_weight": float(weight),
            "energy_layer": layer,
            "guidance_masks": control[0] if control else "given",
        }
    if run.startswith("adv:"):
        return {"method": "baseline", "adversarial_epsilon": float(run.removeprefix("adv:")), "group_size": group_size}
    if run == "control":
        return {"method": "sgt", "mask_selection": "random", "group_size": group_size}
    if run in ("baseline", "sgt", "decor", "saliencydecor"):
        return {"method": run, "group_size": group_size}
    raise SystemExit(
        f"unknown run {run!r}: use baseline, sgt, decor, saliencydecor, control, adv:EPS, bcos:B, energy:LAYER:WEIGHT "
        "or mosaic:P."
    )


def run_mosaic(run: str) -> dict | None:
    """``GridMosaics`` settings of a run's ``mosaic:P[:other]`` part (None without one).

    Example:
        >>> run_mosaic("mosaic:0.5:other+energy:features:5")
        {'probability': 0.5, 'mask_cell': 'other'}
    """
    for part in run.split("@")[0].split("+"):
        if part.startswith("mosaic:"):
            probability, *cell = part.removeprefix("mosaic:").split(":")
            if cell not in ([], ["other"]):
                raise SystemExit(f"run {run!r}: mosaic:P takes one option, ':other' (the mask on another class's cell)")
            return {"probability": float(probability), "mask_cell": cell[0] if cell else "own"}
    return None


def mask_scores(model, evaluation, name: str, batch_size: int) -> dict:
    """Relevance mass and the energy pointing game of explanation ``name`` on a mask set's whole split."""
    scores = localization_metrics(model, DataLoader(evaluation, batch_size=batch_size), name, blur_sigma=None)
    return {key: scores[key] for key in ("relevance_mass", "energy_pointing_game")}


def score(model, evaluation, grids, explanations, disconnected: bool, batch_size: int) -> dict:
    entry = {"accuracy": accuracy(model, DataLoader(evaluation, batch_size=batch_size)), "gridpg": {}}
    for name in explanations:
        if name == "native" and not is_bcos(model):
            continue  # a model's own explanation: only B-cos models have one here
        entry["gridpg"][name] = grid_pointing_game(model, evaluation, grids, attribution=name).to_dict()
        if disconnected:
            result = grid_pointing_game(model, evaluation, grids, attribution=name, disconnected=True)
            entry["gridpg"][f"{name} (disconnected)"] = result.to_dict()
        if getattr(evaluation, "masks", None) is not None:  # a localization set: the objects' masks
            entry.setdefault("masks", {})[name] = mask_scores(model, evaluation, name, batch_size)
    return entry


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def paired_cells(first: list[dict], second: list[dict], only_correct: bool) -> tuple[float, float, int, list[float]]:
    """Mean per-cell difference (second − first) over paired seeds, its sign-flip p-value, the cell count and
    the per-seed mean differences.

    Cells are paired by (seed, grid, cell); with ``only_correct`` a cell counts where both models
    classify its image alone correctly. The pooled test treats cells as independent; the per-seed
    means show whether every seed agrees.
    """
    differences = []
    for a, b in zip(first, second, strict=True):
        sa, sb = torch.tensor(a["scores"]), torch.tensor(b["scores"])
        keep = torch.ones_like(sa, dtype=torch.bool)
        if only_correct:
            keep = torch.tensor(a["correct"]) & torch.tensor(b["correct"])
        differences.append((sb - sa)[keep].double())
    per_seed = [float(d.mean()) if d.numel() else float("nan") for d in differences]
    diff = torch.cat(differences)
    if diff.numel() == 0:
        return float("nan"), float("nan"), 0, per_seed
    observed = diff.mean().abs()
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (10000, diff.numel()), generator=generator).double() * 2 - 1
    p = float(((signs * diff).mean(1).abs() >= observed - 1e-15).double().mean())
    return float(diff.mean()), p, diff.numel(), per_seed


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


def write_report(output: Path, results: dict) -> None:
    runs, meta = results["runs"], results["meta"]
    explanations = [e for e in meta["explanations"]] + [f"{e} (disconnected)" for e in meta["explanations"]]
    explanations = [e for e in explanations if any(e in s["gridpg"] for r in runs.values() for s in r.values())]
    lines = [
        f"# Grid pointing game: {meta['data']}, {meta['model']}",
        "",
        *[f"Command: `{command}`" for command in meta.get("commands", [meta["command"]])],
        "",
        f"Machine: {meta['machine']}. {meta['image_size']} px cells, {meta['epochs']} epochs, seeds "
        f"{meta['seeds']}; {meta['grids']} fixed {meta['n']}×{meta['n']} grids of the `{meta['split']}` split "
        f"(chance {1 / meta['n'] ** 2:.2f}). GridPG = share of the explanation's positive part in the target's "
        'own cell; "correct" = the cells whose image alone the model classifies correctly. Mean ± std over seeds.',
        "",
        "| run | accuracy % | " + " | ".join(f"{e}: all | {e}: correct" for e in explanations) + " |",
        "|---|---|" + "---|---|" * len(explanations),
    ]
    for run, seeds in runs.items():
        cells = [_mean_std([s["accuracy"] for s in seeds.values()])]
        for e in explanations:
            cells.append(_mean_std([s["gridpg"][e]["mean"] for s in seeds.values() if e in s["gridpg"]]))
            cells.append(_mean_std([s["gridpg"][e]["mean_correct"] for s in seeds.values() if e in s["gridpg"]]))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    if any("masks" in s for r in runs.values() for s in r.values()):
        lines += [
            "",
            "On the objects' masks (the whole split): relevance mass | energy pointing game (positive part on the "
            "object; images whose map has no mass left out of relevance mass), mean ± std over seeds:",
            "",
            "| run | " + " | ".join(f"{e}: mass | {e}: energy" for e in meta["explanations"]) + " |",
            "|---|" + "---|---|" * len(meta["explanations"]),
        ]
        for run, seeds in runs.items():
            cells = []
            for e in meta["explanations"]:
                for key in ("relevance_mass", "energy_pointing_game"):
                    values = [finite_mean(s["masks"][e][key]) for s in seeds.values() if e in s.get("masks", {})]
                    cells.append(_mean_std(values))
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
    baseline = runs.get("baseline", {})
    if baseline:
        best = max(
            [e for e in meta["explanations"] if all(e in s["gridpg"] for s in baseline.values())],
            key=lambda e: statistics.mean(s["gridpg"][e]["mean_correct"] for s in baseline.values()),
        )
        lines += [
            "",
            f"The baseline's best explanation (correct cells): **{best}** — the bar every method must beat.",
            "",
            "Paired per-cell differences against the baseline (same seeds, grids and cells; cells correct for "
            "both models; sign-flip test, 10,000 draws):",
            "",
            "| run | explanation | Δ GridPG vs baseline, same explanation (per seed) | p | Δ vs the baseline's best "
            f"({best}) (per seed) | p | cells |",
            "|---|---|---|---|---|---|---|",
        ]
        for run, seeds in runs.items():
            if run == "baseline":
                continue
            common = sorted(set(seeds) & set(baseline))
            for e in meta["explanations"]:
                if not all(e in seeds[s]["gridpg"] for s in common):
                    continue  # e.g. native: B-cos runs only
                bar = paired_cells(
                    [baseline[s]["gridpg"][best] for s in common], [seeds[s]["gridpg"][e] for s in common], True
                )
                same_text = "— (the baseline has no such explanation) | —"
                if all(e in baseline[s]["gridpg"] for s in common):
                    same = paired_cells(
                        [baseline[s]["gridpg"][e] for s in common], [seeds[s]["gridpg"][e] for s in common], True
                    )
                    same_text = f"{same[0]:+.3f} ({_seeds(same[3])}) | {same[1]:.4f}"
                lines.append(
                    f"| {run} | {e} | {same_text} | {bar[0]:+.3f} ({_seeds(bar[3])}) | {bar[1]:.4f} | {bar[2]} |"
                )
    (output / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="image folder with train/ and test/ (or val/)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--image-size", type=int, default=96, help="cell size: the model's input size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    parser.add_argument("--explanations", nargs="+", default=list(EXPLANATIONS))
    parser.add_argument("--grids", type=int, default=100, help="fixed grids (the same for every model)")
    parser.add_argument("--grid-n", type=int, default=2)
    parser.add_argument("--disconnected", action="store_true", help="also the disconnected variant (Rao et al.)")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args(argv)

    output = Path(args.output_dir)
    if args.report_only:
        write_report(output, json.loads((output / "results.json").read_text()))
        return 0
    output.mkdir(parents=True, exist_ok=True)
    results_file = output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    cfg = getattr(load_model(args.model, 2), "pretrained_cfg", None) or {}  # the model's own normalisation
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
    train, evaluation, classes, split = load_splits(Path(args.data), args.image_size, mean, std)
    grids = make_grids(evaluation.labels.tolist(), args.grids, n=args.grid_n, seed=0)
    command = "python benchmarks/gridpg_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results["meta"] = {
        "data": args.data,
        "model": args.model,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seeds": sorted(set(results.get("meta", {}).get("seeds", [])) | set(args.seeds)),
        "grids": args.grids,
        "n": args.grid_n,
        "split": split,
        "explanations": args.explanations,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": command,
        "commands": commands_run(results.get("meta", {}), command),
    }
    hyper = {
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "warmup_steps": 0,
        "bf16": False,
    }
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            for run in args.runs:
                done = results["runs"].get(run, {}).get(str(seed))
                wanted = [e for e in args.explanations if e != "native" or run.startswith("bcos:")]
                if done is not None and all(e in done["gridpg"] for e in wanted):
                    continue
                start = time.perf_counter()
                method, schedule = run_schedule(run, hyper)
                steps = math.ceil(len(train) / args.batch_size) * schedule["epochs"]
                config = run_config(method, args.group_size, steps)
                workdir_run = f"{workdir}/{run}-{seed}"
                mosaic = run_mosaic(run)
                data = train if mosaic is None else GridMosaics(train, n=args.grid_n, **mosaic)
                model, seconds = train_one(config, seed, args.model, classes, data, schedule, workdir_run)
                entry = score(model, evaluation, grids, args.explanations, args.disconnected, args.eval_batch_size)
                entry["train_seconds"] = seconds
                results["runs"].setdefault(run, {})[str(seed)] = entry
                results_file.write_text(json.dumps(results))
                write_report(output, results)
                summary = {e: round(v["mean_correct"], 3) for e, v in entry["gridpg"].items()}
                print(
                    f"{run} seed {seed}: accuracy {entry['accuracy']:.1f}%, GridPG (correct cells) {summary}, "
                    f"{time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    write_report(output, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
