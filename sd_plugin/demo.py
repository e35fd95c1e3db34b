"""The offline demo: baseline vs SaliencyDecor on scikit-learn's digits, in minutes on a CPU.

``python -m sd_plugin demo`` (what ``make demo`` runs) trains a small transformers ResNet
with ``SaliencyDecorTrainer`` for each method and seed, then prints accuracy, the masking
AUC in saliency and random order and their gap (the paper's masking test, every 5% of the
pixels), mean ± std over seeds, and saves each model (safetensors), a saliency figure, the
masking curves, a gradient box plot and a ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .evaluation import faithfulness_gap, masking_curve, saliency_maps
from .integrations.config import SaliencyDecorConfig
from .integrations.trainer import SaliencyDecorTrainer
from .storage.data import TensorImageDataset, load_digits_splits

__all__ = ["build_demo_model", "run_demo", "main"]


def build_demo_model(seed: int = 0):
    """A small transformers ResNet for 1-channel 16x16 digits (64 penultimate features)."""
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


def _train_one(method: str, seed: int, train: TensorImageDataset, output_dir: Path, epochs: int, batch_size: int):
    model = build_demo_model(seed)
    args = SaliencyDecorConfig(
        output_dir=str(output_dir),
        method=method,
        group_size=16,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        dataloader_drop_last=True,  # the last 30 images would make a batch below 2 x group_size
        learning_rate=3e-3,
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
    )
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    return model.eval(), seconds


def _mean_std(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


def run_demo(
    output_dir: str | Path = "outputs/demo",
    methods: tuple[str, ...] = ("baseline", "sgt", "saliencydecor"),
    epochs: int = 12,
    seeds: tuple[int, ...] = (0, 1, 2),
    batch_size: int = 64,
) -> list[dict]:
    """Train and evaluate each method for each seed; one summary row per method."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_splits(seed=0)
    loader = DataLoader(test, batch_size=256)
    examples, example_labels = test.images[:6], test.labels[:6]
    rows, saliency, curves = [], {}, {}
    for method in methods:
        runs = []
        for seed in seeds:
            model, seconds = _train_one(method, seed, train, output_dir / method / f"seed{seed}", epochs, batch_size)
            by_saliency = masking_curve(model, loader, order="saliency")
            by_random = masking_curve(model, loader, order="random", seed=seed)
            runs.append(
                {
                    "seed": seed,
                    "accuracy": by_saliency.clean_accuracy,
                    "masking_auc": by_saliency.auc,
                    "masking_auc_random": by_random.auc,
                    "faithfulness_gap": faithfulness_gap(by_saliency.auc, by_random.auc),
                    "train_seconds": seconds,
                    "curves": [by_saliency.to_dict(), by_random.to_dict()],
                }
            )
            if seed == seeds[0]:
                saliency[method] = saliency_maps(model, examples, example_labels)
                curves[method] = [by_saliency, by_random]
        row = {"method": method, "seeds": list(seeds), "runs": runs}
        for key in ("accuracy", "masking_auc", "masking_auc_random", "faithfulness_gap", "train_seconds"):
            row[key], row[key + "_std"] = _mean_std([run[key] for run in runs])
        rows.append(row)
    figures = _write_figures(output_dir, examples, example_labels, saliency, curves)
    (output_dir / "results.json").write_text(json.dumps({"rows": rows, "figures": figures}, indent=2))
    return rows


def _write_figures(output_dir: Path, examples, labels, saliency, curves) -> list[str]:
    try:
        from .evaluation.figures import gradient_boxplot, masking_curves_figure, saliency_grid
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
    """Markdown table: mean +- std over seeds."""
    lines = [
        "| method | accuracy % | masking AUC (saliency) | masking AUC (random) | faithfulness gap | train s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['accuracy']:.2f} ± {row['accuracy_std']:.2f} "
            f"| {row['masking_auc']:.0f} ± {row['masking_auc_std']:.0f} "
            f"| {row['masking_auc_random']:.0f} ± {row['masking_auc_random_std']:.0f} "
            f"| {row['faithfulness_gap']:.3f} ± {row['faithfulness_gap_std']:.3f} "
            f"| {row['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_plugin demo",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["baseline", "sgt", "saliencydecor"])
    args = parser.parse_args(argv)
    rows = run_demo(args.output_dir, tuple(args.methods), args.epochs, tuple(args.seeds))
    print()
    print(f"Digits (scikit-learn, 16x16), small transformers ResNet, {args.epochs} epochs, seeds {args.seeds}.")
    print("Masking AUC: accuracy (%) vs top-p% salient pixels removed, lower = more faithful; gap =")
    print("(AUC_random - AUC_saliency) / AUC_random, higher = the saliency finds the pixels that matter.")
    print(format_table(rows))
    print(f"\nModels, figures and results.json in {args.output_dir}/")
    return 0
