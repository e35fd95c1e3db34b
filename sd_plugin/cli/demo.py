"""The offline demo: every training method beside its controls, scored against ground truth, on a CPU.

``python -m sd_plugin demo`` (what ``make demo`` runs) trains a small transformers ResNet with
``SaliencyDecorTrainer`` on cluttered digits (scikit-learn's digits at a random place among
fragments of other digits; ``sd_plugin.storage.cluttered_digits``) for each run and seed: plain
training, SGT, SaliencyDecor and the **random-mask control** (SGT's masking and KL with pixels
drawn at random: robustness to masking without saliency guidance); ``--runs ... adversarial`` adds
small-budget adversarial training (ℓ∞, ε = 0.02; RESULTS.md §S). Each model's input-gradient saliency is scored by

- accuracy on the test canvases;
- the **mean-fill gap** ``(AUC_random - AUC_saliency) / AUC_random`` of the masking test: how much
  faster accuracy falls when the salient pixels are replaced by the mean than random ones. A
  masking-trained model raises it by being robust to masking; it is not evidence on its own;
- **ROAD LeRF−MoRF**: the same test with ROAD's noisy linear imputation (which no model trained
  here has seen), least-salient-first minus most-salient-first, over the random order's AUC;
- **relevance mass** and the **pointing game** on the digit's square: the ground truth.

It prints mean ± std over seeds and a reading generated from the numbers (which differences to the
baseline and to the control exceed one standard deviation), and saves each model (safetensors), a
saliency figure, the ROAD curves, a gradient box plot and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..evaluation import saliency_maps
from ..evaluation.masking_curve import faithfulness_curves, percentages_every
from ..evaluation.report import finite_mean, localization_metrics, precompute_maps, removal_metrics
from ..integrations.config import SaliencyDecorConfig
from ..integrations.trainer import SaliencyDecorTrainer
from ..storage.cluttered_digits import cluttered_digits_splits
from ..storage.tensor_datasets import TensorImageDataset
from ..utils.previous_run import guard_previous_run

__all__ = ["DEMO_RUNS", "DemoRun", "build_demo_model", "format_table", "reading", "run_demo", "main"]

CONTROL = "random-mask control"


@dataclass(frozen=True)
class DemoRun:
    """One row of the demo: a name and the ``SaliencyDecorConfig`` fields that make it."""

    name: str
    method: str
    settings: dict = field(default_factory=dict)


DEMO_RUNS = (
    DemoRun("baseline", "baseline"),
    DemoRun("sgt", "sgt"),
    DemoRun("saliencydecor", "saliencydecor"),
    DemoRun(CONTROL, "sgt", {"mask_selection": "random"}),
    DemoRun("adversarial", "baseline", {"adversarial_epsilon": 0.02}),
)
DEFAULT_RUNS = ("baseline", "sgt", "saliencydecor", CONTROL)  # adversarial: not recommended (RESULTS.md §S)
TRAIN_COPIES = 3  # canvases per training digit
# What a demo leaves in its folder: a new demo there is refused unless --overwrite (which deletes them first).
DEMO_RUN_FILES = ("results.json", "*/seed*", "saliency.png", "masking_curves.png", "gradient_boxplot.png")
COLUMNS = (  # (key, header, format)
    ("accuracy", "accuracy % ↑", "{:.1f}"),
    ("faithfulness_gap", "mean-fill gap ↑ (robustness to masking)", "{:.3f}"),
    ("road_lerf_morf_gap", "ROAD LeRF−MoRF ↑", "{:.3f}"),
    ("relevance_mass", "relevance mass ↑", "{:.3f}"),
    ("pointing_game", "pointing game ↑", "{:.2f}"),
)


def build_demo_model(seed: int = 0):
    """A small transformers ResNet for 1-channel digits (64 penultimate features)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        downsample_in_first_stage=False,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    return ResNetForImageClassification(config)


def _train_one(run: DemoRun, seed: int, train: TensorImageDataset, output_dir: Path, epochs: int, batch_size: int):
    model = build_demo_model(seed)
    args = SaliencyDecorConfig(
        output_dir=str(output_dir),
        method=run.method,
        group_size=16,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        dataloader_drop_last=True,  # a last batch below 2 x group_size would make the whitening noisy
        learning_rate=5e-3,
        weight_decay=1e-4,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        log_level="error",
        **run.settings,
    )
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    return model.eval(), seconds


def _score(model, test, metric_images: int, step: float, seed: int) -> tuple[dict, dict]:
    """The demo's metrics of one model, and its ROAD curves (for the figure); one saliency pass feeds them all."""
    with torch.no_grad():
        logits = model(pixel_values=test.images).logits
    accuracy = 100.0 * float((logits.argmax(-1) == test.labels).double().mean())
    maps = precompute_maps(model, test, metric_images, batch_size=metric_images)
    scored = DataLoader(test, batch_size=metric_images)
    curves = faithfulness_curves(
        model, scored, percentages=percentages_every(step), fills=("mean", "road"), attribution=maps, seed=seed,
        max_images=metric_images,
    )  # fmt: skip
    located = localization_metrics(model, scored, maps, blur_sigma=None, max_images=metric_images)
    scores = {
        "accuracy": accuracy,
        "faithfulness_gap": removal_metrics(curves, "mean")["faithfulness_gap"],
        "road_lerf_morf_gap": removal_metrics(curves, "road")["lerf_morf_gap"],
        "relevance_mass": finite_mean(located["relevance_mass"]),
        "pointing_game": finite_mean(located["pointing_game"]),
    }
    return scores, {order: curves["map", "road", order] for order in ("saliency", "random")}


def _mean_std(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


def run_demo(
    output_dir: str | Path = "outputs/demo",
    runs: tuple[DemoRun, ...] = tuple(run for run in DEMO_RUNS if run.name in DEFAULT_RUNS),
    epochs: int = 4,
    seeds: tuple[int, ...] = (0, 1, 2),
    batch_size: int = 128,
    metric_images: int = 150,
    step: float = 10.0,
    overwrite: bool = False,
) -> list[dict]:
    """Train and score each run for each seed; one summary row per run (mean and std over seeds)."""
    output_dir = Path(output_dir)
    replaced = guard_previous_run(
        output_dir,
        DEMO_RUN_FILES,
        overwrite=overwrite,
        resume_hint="(a demo does not resume)",
        overwrite_hint="--overwrite (`make demo` passes it)",
    )
    if replaced:
        print(f"replacing the previous demo in {output_dir}/ ({', '.join(replaced)})")
    output_dir.mkdir(parents=True, exist_ok=True)
    train, test = cluttered_digits_splits(train_copies=TRAIN_COPIES, seed=0)
    examples, example_labels = test.images[:6], test.labels[:6]
    rows, saliency, figure_curves = [], {}, {}
    for run in runs:
        per_seed = []
        for seed in seeds:
            folder = output_dir / run.name.replace(" ", "-") / f"seed{seed}"
            model, seconds = _train_one(run, seed, train, folder, epochs, batch_size)
            scores, curves = _score(model, test, min(metric_images, len(test)), step, seed)
            per_seed.append({"seed": seed, **scores, "train_seconds": seconds})
            if seed == seeds[0]:
                saliency[run.name] = saliency_maps(model, examples, example_labels)
                figure_curves[run.name] = [curves["saliency"], curves["random"]]
        row = {"method": run.name, "objective": run.method, "settings": run.settings, "seeds": list(seeds)}
        row["folder"] = str(folder.parent)
        row["runs"] = per_seed
        for key in [*(c[0] for c in COLUMNS), "train_seconds"]:
            row[key], row[key + "_std"] = _mean_std([s[key] for s in per_seed])
        rows.append(row)
    figures = _write_figures(output_dir, examples, example_labels, saliency, figure_curves)
    meta = {"data": f"cluttered digits 20x20, {TRAIN_COPIES} training canvases per digit", "epochs": epochs}
    meta.update(metric_images=min(metric_images, len(test)), step=step, test_images=len(test))
    (output_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "figures": figures}, indent=2))
    return rows


def _write_figures(output_dir: Path, examples, labels, saliency, curves) -> list[str]:
    try:
        from ..evaluation.figures import gradient_boxplot, masking_curves_figure, saliency_grid
    except ImportError:  # pragma: no cover
        return []
    try:
        paths = [
            saliency_grid(examples, saliency, output_dir / "saliency.png", labels=[f"digit {int(y)}" for y in labels]),
            masking_curves_figure(curves, output_dir / "masking_curves.png"),
            gradient_boxplot(saliency, output_dir / "gradient_boxplot.png"),
        ]
    except ImportError as error:
        print(f"(figures skipped: {error})")
        return []
    return [str(p) for p in paths]


def format_table(rows: list[dict]) -> str:
    """Markdown table: mean ± std over seeds, one row per run."""
    lines = [
        "| run | " + " | ".join(header for _, header, _ in COLUMNS) + " | train s ↓ |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [f"{fmt.format(row[key])} ± {fmt.format(row[key + '_std'])}" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['train_seconds']:.1f} |")
    return "\n".join(lines)


def _compare(row: dict, other: dict, key: str) -> tuple[float, bool]:
    """The difference of the means and whether it exceeds one (pooled) standard deviation over seeds."""
    difference = row[key] - other[key]
    spread = math.sqrt((row[key + "_std"] ** 2 + other[key + "_std"] ** 2) / 2)
    return difference, abs(difference) > spread


def reading(rows: list[dict]) -> str:
    """One paragraph on the table, from its numbers: what beats the baseline and the control by more than 1 std."""
    by_name = {row["method"]: row for row in rows}
    baseline, control = by_name.get("baseline"), by_name.get(CONTROL)
    if baseline is None:
        return "No baseline row: nothing to compare against."
    sentences, passes = [], []
    for row in rows:
        if row is baseline or row is control:
            continue
        parts = []
        for key, label in (("relevance_mass", "relevance mass"), ("road_lerf_morf_gap", "ROAD LeRF−MoRF")):
            difference, clear = _compare(row, baseline, key)
            part = f"{label} {difference:+.3f} vs baseline ({'beyond' if clear else 'within'} 1 std)"
            if control is not None:
                to_control, clear_control = _compare(row, control, key)
                part += f", {to_control:+.3f} vs the control ({'beyond' if clear_control else 'within'} 1 std)"
            parts.append(part)
        accuracy = row["accuracy"] - baseline["accuracy"]
        sentences.append(f"{row['method']}: " + "; ".join(parts) + f"; accuracy {accuracy:+.1f} points.")
        references = [baseline] if control is None else [baseline, control]
        comparisons = [_compare(row, reference, "relevance_mass") for reference in references]
        if all(difference > 0 and clear for difference, clear in comparisons):
            passes.append(f"{row['method']} ({accuracy:+.1f} accuracy points)")
    if control is not None:
        difference, clear = _compare(control, baseline, "relevance_mass")
        sentences.append(
            f"The control itself: relevance mass {difference:+.3f} vs baseline "
            f"({'beyond' if clear else 'within'} 1 std) — what masking alone does, without saliency."
        )
    verdict = (
        "Beyond one std above both the baseline and the control on relevance mass: " + ", ".join(passes) + "."
        if passes
        else "No run is beyond one std above both the baseline and the control on relevance mass."
    )
    return " ".join([verdict, *sentences])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_plugin demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--epochs", type=int, default=4, help=f"passes over the {TRAIN_COPIES} canvases per digit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    names = [run.name for run in DEMO_RUNS]
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=names, metavar="RUN", help=str(names))
    parser.add_argument("--metric-images", type=int, default=150, help="test images the saliency metrics score")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a previous demo in --output-dir (refused without it)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: train at least 1 epoch.")
    if args.metric_images < 1:
        parser.error(f"--metric-images {args.metric_images}: score at least 1 image.")
    runs = tuple(run for run in DEMO_RUNS if run.name in args.runs)
    start = time.perf_counter()
    rows = run_demo(
        args.output_dir,
        runs,
        args.epochs,
        tuple(args.seeds),
        metric_images=args.metric_images,
        overwrite=args.overwrite,
    )
    print()
    print(
        f"Cluttered digits (20x20: a 12 px scikit-learn digit among 4 fragments of others), small transformers ResNet, "
        f"{args.epochs} epochs, seeds {args.seeds}; saliency = input gradient, scored on "
        f"{min(args.metric_images, 359)} test images."
    )
    print(format_table(rows))
    print()
    print(
        "Relevance mass: share of the gradient on the digit's square; pointing game: the peak on it (ground "
        "truth). ROAD LeRF−MoRF: removal with an imputation no model here was trained on. The mean-fill gap "
        "measures robustness to mean-filled masks, which masking-trained models (the control too) learn."
    )
    print()
    print(reading(rows))
    print(f"\nModels, figures and results.json in {args.output_dir}/ ({time.perf_counter() - start:.0f} s)")
    return 0
