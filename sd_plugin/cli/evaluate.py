"""``python -m sd_plugin evaluate``: score one or more image classifiers on one dataset.

Prints a table of the main metrics (``metrics.TABLE_METRICS``: accuracy, the removal gaps under
the mean fill and under ROAD imputation, the blur control, deletion/insertion and, on a
localization dataset, relevance mass / rank and the pointing game) and writes ``results.json``
with every metric of ``metrics.METRICS``, each metric's direction, per-image scores, plus
``saliency.png``, ``masking_curves.png`` and ``gradient_boxplot.png`` to ``--output-dir``.

Example:
    python -m sd_plugin evaluate --model outputs/demo/saliencydecor/seed0 \\
        --compare outputs/demo/baseline/seed0 --dataset cluttered-digits --output-dir outputs/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..evaluation.attribution import ATTRIBUTIONS, saliency_maps
from ..evaluation.grid_pointing_game import dataset_labels, grid_pointing_game, make_grids
from ..evaluation.masking_curve import CURVE_FILLS, MaskingCurve, percentages_every, random_subset
from ..evaluation.metrics import METRICS, RESULT_FIELDS, TABLE_METRICS, metric_directions
from ..evaluation.randomization import parameter_randomization
from ..evaluation.report import evaluate_model, first_images
from ..storage.eval_datasets import check_labels_fit, load_eval_dataset, model_class_names
from ..storage.loading import load_classifier, weights_fingerprint
from ..storage.model_preprocessing import image_transform

__all__ = ["main", "format_table", "table_legend"]

EPILOG = (
    "A localization dataset is a folder written by sd_plugin.storage.localization_data (benchmarks/"
    "localization_data.py: objects pasted on photos, or --layout blocks: Block-MNIST-style): images plus one "
    "ground-truth object mask each. On one, evaluate adds relevance mass (share of the map's total inside the mask, "
    "higher is better), relevance rank (share of the map's top-K pixels inside the mask, K its size, "
    "higher is better) and the pointing game (whether the map's maximum is on the object, higher is better), each "
    "also for the blurred map. results.json: 'metrics' gives every metric's title, description and "
    "higher_is_better; each model's 'per_image' lists per-image scores in the order of the evaluated images, with "
    "the direction of the metric of the same name."
)

# What each group of table columns means; a line is printed when one of its columns is in the table.
_LEGEND = (
    (
        ("faithfulness_gap", "lerf_morf_gap", "road_lerf_morf_gap"),
        "gap = (AUC_random - AUC_MoRF) / AUC_random; LeRF-MoRF = (AUC_LeRF - AUC_MoRF) / AUC_random, under the "
        "mean fill and under ROAD imputation;",
    ),
    (
        ("blurred_road_lerf_morf_gap", "blurred_insertion_auc", "blurred_relevance_mass"),
        "blur: the same metric for the maps Gaussian-blurred (a map that is sharper and more faithful beats it);",
    ),
    (("deletion_auc", "insertion_auc"), "del/ins: RISE deletion / insertion;"),
    (
        ("relevance_mass", "relevance_rank", "pointing_game"),
        "mass/rank/point: relevance mass, relevance rank and pointing game on the ground-truth objects;",
    ),
    (
        ("grid_pointing_game", "grid_pointing_game_disconnected"),
        "GridPG: grid pointing game, the share of the explanation's positive part in its class's cell of a grid of "
        "images of distinct classes (chance 1/n²); ok: cells whose image alone is classified correctly;",
    ),
)


def format_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per model, the columns of ``TABLE_METRICS`` that any model has.

    Each title carries its direction (↑ higher is better, ↓ lower is better).
    """
    keys = [key for key in TABLE_METRICS if any(key in metrics for metrics in results.values())]
    arrows = {True: " ↑", False: " ↓", None: ""}
    titles = [METRICS[key].title + arrows[METRICS[key].higher_is_better] for key in keys]
    lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, metrics in results.items():
        cells = [METRICS[key].fmt.format(metrics[key]) if key in metrics else "–" for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_legend(results: dict[str, dict]) -> str:
    """The lines under ``format_table`` that explain the columns it has (none for absent ones).

    Example:
        >>> print(table_legend({"m": {"accuracy": 90.0, "deletion_auc": 0.1}}))
        del/ins: RISE deletion / insertion;
        Every metric and per-image scores are in results.json.
    """
    present = {key for metrics in results.values() for key in metrics}
    lines = [text for keys, text in _LEGEND if present.intersection(keys)]
    return "\n".join([*lines, "Every metric and per-image scores are in results.json."])


def _display_name(path: str, taken: set[str]) -> str:
    parts = Path(path.rstrip("/")).parts
    name = "/".join(parts[-2:]) if len(parts) > 1 else path
    while name in taken:
        name += "'"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sd_plugin evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--compare", nargs="*", default=[], help="more models to score side by side")
    parser.add_argument(
        "--dataset",
        required=True,
        help="'digits', 'fashion-mnist', 'cluttered-digits' (built in, at the size the model was trained at; the "
        "last is the demo's data, with the digit's square as ground truth), a dataset folder (save_to_disk or "
        "image folder), a Hub id, or a localization dataset: a folder with images and a ground-truth object mask "
        "per image (benchmarks/localization_data.py writes them, --layout blocks too); a dataset with masks adds "
        "relevance mass, relevance rank and the pointing game",
    )
    parser.add_argument("--split", default=None, help="dataset split (default: test/validation)")
    parser.add_argument("--output-dir", required=True, help="where results.json and the figures go")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward")
    parser.add_argument(
        "--max-images", type=int, default=None, help="evaluate on N images drawn at random (seeded, over all classes)"
    )
    parser.add_argument("--step", type=float, default=5.0, help="masking-curve step in percent (0..100]")
    parser.add_argument(
        "--fill",
        default="mean",
        choices=[f for f in CURVE_FILLS if f != "road"],
        help="what replaces a removed pixel in the main curves (ROAD imputation runs beside them)",
    )
    parser.add_argument("--no-road", action="store_true", help="skip the curves under ROAD's noisy linear imputation")
    parser.add_argument(
        "--blur-sigma", type=float, default=2.0, help="sigma (pixels) of the blur control; 0 switches it off"
    )
    parser.add_argument(
        "--attribution",
        default="gradient",
        choices=[a for a in ATTRIBUTIONS if a != "random"],
        help="saliency method that ranks the pixels",
    )
    parser.add_argument(
        "--grid-pointing-game",
        type=int,
        default=0,
        metavar="GRIDS",
        help="also score the grid pointing game on GRIDS fixed n x n grids of the dataset's images of distinct "
        "classes (the same grids for every model; 0: off). Needs a model that takes n times its input size",
    )
    parser.add_argument("--grid-n", type=int, default=2, help="cells per side of the grid pointing game's grids")
    parser.add_argument(
        "--grid-disconnected", action="store_true", help="also the disconnected grid pointing game (Rao et al.)"
    )
    parser.add_argument("--randomization", action="store_true", help="also run the parameter-randomisation check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random order and fill")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--skip-unreadable-images",
        action="store_true",
        help="drop image files that do not decode (each decoded once first; one warning counts them)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)  # created when there is something to write
    results: dict[str, dict] = {}
    saliency: dict[str, torch.Tensor] = {}
    curves: dict[str, list[MaskingCurve]] = {}
    examples, class_names = None, None
    grids = None
    for path in [args.model, *args.compare]:
        name = _display_name(path, set(results))
        model = load_classifier(path).to(args.device)
        directory = path if Path(path).is_dir() else None
        dataset = _load_dataset(args.dataset, args.split, model, directory)
        if len(dataset) == 0:
            raise SystemExit(f"dataset {args.dataset!r} (split {args.split}) is empty.")
        split = getattr(dataset, "split", None) or args.split  # the split loaded, as the loader chose it
        if args.skip_unreadable_images and hasattr(dataset, "without_unreadable"):
            dataset = dataset.without_unreadable()
        if args.grid_pointing_game:  # drawn once from the whole split: the same grids for every model
            grids = grids or make_grids(dataset_labels(dataset), args.grid_pointing_game, n=args.grid_n, seed=args.seed)
            grid_dataset = dataset
        if args.max_images is not None:  # the same seeded, class-spread images for every model
            dataset = random_subset(dataset, args.max_images)
        metrics = evaluate_model(
            model,
            dataset,
            batch_size=args.batch_size,
            percentages=percentages_every(args.step),
            fill=args.fill,
            attribution=args.attribution,
            max_images=args.max_images,
            seed=args.seed,
            progress=not args.no_progress,
            road=not args.no_road,
            blur_sigma=args.blur_sigma or None,
        )
        if args.grid_pointing_game:
            for disconnected in (False, True) if args.grid_disconnected else (False,):
                game = grid_pointing_game(
                    model, grid_dataset, grids, attribution=args.attribution, disconnected=disconnected
                ).to_dict()
                key = "grid_pointing_game_disconnected" if disconnected else "grid_pointing_game"
                metrics[key], metrics[f"{key}_correct"] = game["mean"], game["mean_correct"]
                metrics[f"{key}_cells"] = game
        metrics["source"] = path
        if directory is not None:
            metrics["weights_sha256"] = weights_fingerprint(directory)
        images, labels = first_images(random_subset(dataset, 6), min(6, len(dataset)))  # spread over classes
        if examples is None:
            examples = (images, labels)
            class_names = model_class_names(model)[1]
        saliency[name] = saliency_maps(model, images.to(args.device), labels.to(args.device), args.attribution).cpu()
        curves[name] = [MaskingCurve(**_curve_args(metrics["curves"][key])) for key in ("saliency", "random")]
        if args.randomization:
            sample = first_images(random_subset(dataset, 16), min(16, len(dataset)))
            check = parameter_randomization(model, sample[0].to(args.device), sample[1].to(args.device))
            metrics["randomization"] = check.to_dict()
        results[name] = metrics
        print(f"evaluated {name}: accuracy {metrics['accuracy']:.2f}%, masking AUC {metrics['masking_auc']:.0f}")
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(output_dir, examples, saliency, curves, class_names, explanation=args.attribution)
    (output_dir / "results.json").write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "split": split,
                "command": "python -m sd_plugin evaluate " + shlex.join(argv),
                "metrics": metric_directions(),
                "fields": RESULT_FIELDS,
                "models": results,
                "figures": figures,
            },
            indent=2,
        )
    )
    print()
    print(format_table(results))
    print("\n" + table_legend(results))
    print(f"Results and figures in {output_dir}/")
    return 0


def _load_dataset(name_or_path: str, split: str | None, model, directory):
    """``load_eval_dataset``, or the localization dataset (with its masks) when the folder is one."""
    from ..storage.localization_data import LocalizationDataset, is_localization_dataset

    if not is_localization_dataset(name_or_path):
        return load_eval_dataset(name_or_path, split, model, directory)
    dataset = LocalizationDataset(name_or_path, split or "test", image_transform(model, directory))
    check_labels_fit(model, len(dataset.classes), dataset.classes, name_or_path)
    return dataset


def _curve_args(curve: dict) -> dict:
    keys = ("percentages", "accuracy", "order", "fill", "num_images")
    return {key: curve[key] for key in keys}


def captions_for(labels, class_names: list[str] | None) -> list[str]:
    """Row captions of the saliency grid: class names when the model has them, else ``label <i>``.

    Example:
        >>> captions_for(torch.tensor([1, 0]), ["cat", "dog"]), captions_for(torch.tensor([2]), None)
        (['dog', 'cat'], ['label 2'])
    """
    return [class_names[int(y)] if class_names and int(y) < len(class_names) else f"label {int(y)}" for y in labels]


def _figures(
    output_dir: Path, examples, saliency, curves, class_names: list[str] | None = None, explanation: str = "gradient"
) -> list[str]:
    try:
        from ..evaluation.figures import gradient_boxplot, masking_curves_figure, saliency_grid
    except ImportError:  # pragma: no cover
        return []
    try:
        images, labels = examples
        captions = captions_for(labels, class_names)
        return [
            str(saliency_grid(images, saliency, output_dir / "saliency.png", labels=captions, explanation=explanation)),
            str(masking_curves_figure(curves, output_dir / "masking_curves.png", explanation=explanation)),
            str(gradient_boxplot(saliency, output_dir / "gradient_boxplot.png", explanation=explanation)),
        ]
    except ImportError as error:
        print(f"(figures skipped: {error})")
        return []
