"""Cost of a SaliencyDecorTrainer step relative to a plain transformers.Trainer step.

Same model weights, same batch, in one run, built so that it cannot flatter:

- **interleaved**: the plain step and every variant run in rounds (a few steps each, the
  order rotated every round), and the ratio to the plain step is taken per round; the table
  prints the median ratio and its range over the rounds, so a slow moment of the machine
  shows as a wide range instead of a wrong ratio;
- **defaults as users get them** (``check_finite`` on; the whitening ``auto``), with the
  non-default settings as rows of their own;
- **memory per variant with nothing else alive**: each variant is built alone for its peak
  (CUDA allocator; on CPU the profiler's allocation events plus the resident weights,
  optimizer state and batch), the reference weights kept on the host;
- **host syncs per variant**: the operators in one training step that make the host wait for
  a GPU (counted on any device by ``common.HostSyncAudit``).

It also times the whitening + decorrelation alone (forward and backward) for each whitening
method, as a share of the plain step.

    python benchmarks/step_cost.py --quick            # CPU size
    python benchmarks/step_cost.py                    # full size (GPU)

Targets (issue 20; docs/cost.md): default step <= 2.1x plain, memory <= 1.15x,
whitening+decor <= 5% of the plain step, no host sync in the default step, a cheaper
masking setting <= 1.5x.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import HostSyncAudit, machine_description, peak_memory, synchronize, tensor_bytes

from sd_plugin import GroupZCA, SaliencyDecorConfig, SaliencyDecorTrainer
from sd_plugin.core.decorrelation import (
    compiled_whitened_decorrelation_loss,
    whitened_decorrelation_loss,
)
from sd_plugin.core.models import PaperCNN

PLAIN = "plain Trainer"
VARIANTS = (
    ("baseline", {"method": "baseline"}),
    ("sgt", {"method": "sgt"}),
    ("sgt (random masks)", {"method": "sgt", "mask_selection": "random"}),
    ("sgt (masked pass every 2nd step)", {"method": "sgt", "masked_pass_every": 2}),
    ("sgt (masked pass every 4th step)", {"method": "sgt", "masked_pass_every": 4}),
    ("sgt (masked pass on 1/4 of the batch)", {"method": "sgt", "masked_fraction": 0.25}),
    ("decor", {"method": "decor"}),
    ("saliencydecor", {"method": "saliencydecor"}),
    ("saliencydecor (masked pass every 2nd step)", {"method": "saliencydecor", "masked_pass_every": 2}),
    ("saliencydecor (eigh)", {"method": "saliencydecor", "whitening_method": "eigh"}),
    ("saliencydecor (newton_schulz)", {"method": "saliencydecor", "whitening_method": "newton_schulz"}),
    ("saliencydecor (compiled whitening)", {"method": "saliencydecor", "whitening_compile": True}),
    ("saliencydecor (check_finite off)", {"method": "saliencydecor", "check_finite": False}),
    ("saliencydecor (both)", {"method": "saliencydecor", "consistency_grad": "both"}),
    # the input-gradient training terms (sd_plugin.core.input_gradients), on the plain objective
    ("adversarial linf eps 0.1, k=1", {"method": "baseline", "adversarial_epsilon": 0.1}),
    ("adversarial l2 eps 0.5, k=1", {"method": "baseline", "adversarial_epsilon": 0.5, "adversarial_norm": "l2"}),
    ("adversarial linf eps 0.1, k=3", {"method": "baseline", "adversarial_epsilon": 0.1, "adversarial_steps": 3}),
    ("input-gradient norm (double backprop)", {"method": "baseline", "input_gradient_weight": 1.0}),
    (
        "input-gradient norm (finite difference)",
        {"method": "baseline", "input_gradient_weight": 1.0, "input_gradient_mode": "finite_difference"},
    ),
    ("RRR mask supervision", {"method": "baseline", "explanation_mask_weight": 1.0}),
    # issue 40: Energy-loss guidance (sd_plugin.core.guidance) and a B-cosified model (sd_plugin.core.bcos)
    ("energy loss, input (Input×Gradient)", {"method": "baseline", "energy_weight": 1.0, "energy_layer": "input"}),
    ("energy loss, features (Grad-CAM)", {"method": "baseline", "energy_weight": 1.0, "energy_layer": "features"}),
    ("B-cos, B = 2", {"method": "baseline", "bcos_b": 2.0}),
    (
        "B-cos, B = 2, energy loss features",
        {"method": "baseline", "bcos_b": 2.0, "energy_weight": 1.0, "energy_layer": "features"},
    ),
)
# the whitening + decorrelation alone: (label, method, compiled)
WHITENINGS = (
    ("cholesky", "cholesky", False),
    ("eigh", "eigh", False),
    ("newton_schulz", "newton_schulz", False),
    ("cholesky compiled", "cholesky", True),
)


def resnet18(num_labels: int = 10):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        num_labels=num_labels,
    )
    return ResNetForImageClassification(config)


def deit_tiny(num_labels: int = 200):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=224,
        patch_size=16,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def efficientnet_lite0(num_labels: int = 10):
    """timm's ``tf_efficientnet_lite0`` (the offline pretrained model's architecture, random weights) as the
    ``TimmWrapperForImageClassification`` a ``Trainer`` user gets from a timm Hub id."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_labels=num_labels)
    return TimmWrapperForImageClassification(config)


def cases(quick: bool) -> list[dict]:
    return [
        {
            "name": "EfficientNet-Lite0 128x128",
            "build": efficientnet_lite0,
            "shape": (3, 128, 128),
            "classes": 10,
            "batch": 16 if quick else 128,
            "group_size": 16,
        },
        {
            "name": "ResNet-18 32x32",
            "build": resnet18,
            "shape": (3, 32, 32),
            "classes": 10,
            "batch": 32 if quick else 128,
            "group_size": 16,
        },
        {
            "name": "DeiT-tiny 224x224",
            "build": deit_tiny,
            "shape": (3, 224, 224),
            "classes": 200,
            "batch": 8 if quick else 128,
            "group_size": 16,
        },
        {
            "name": "paper CNN 28x28",
            "build": PaperCNN.mnist,
            "shape": (1, 28, 28),
            "classes": 10,
            "batch": 128,
            "group_size": 8,
        },
    ]


def resident_bytes(trainer, batch) -> int:
    """Weights, buffers, optimizer state and the batch: what a step starts with."""
    return tensor_bytes(trainer.model, list(trainer.optimizer.state.values()), batch)


def build_trainer(case: dict, overrides: dict | None, reference_state: dict, device, output_dir: str):
    """A plain ``Trainer`` (``overrides=None``) or a ``SaliencyDecorTrainer`` with the method settings.

    ``case["bf16"]``: both under bf16 autocast (the Trainer's ``bf16=True``).
    """
    from transformers import Trainer, TrainingArguments

    model = case["build"]()
    model.load_state_dict(reference_state)
    model.to(device)
    common = dict(output_dir=output_dir, report_to="none", use_cpu=device.type == "cpu", learning_rate=1e-4)
    common["bf16"] = bool(case.get("bf16"))
    if overrides is None:
        trainer = Trainer(model=model, args=TrainingArguments(**common))
    else:
        args = SaliencyDecorConfig(**common, group_size=case["group_size"], **overrides)
        trainer = SaliencyDecorTrainer(model=model, args=args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the step reads it
    return trainer


def batch_for(trainer, batch: dict) -> dict:
    """``batch`` with what the trainer's method reads besides images and labels (RRR, Energy loss: an object mask)."""
    batch = dict(batch)
    if getattr(trainer.args, "needs_masks", False) or getattr(trainer.args, "explanation_mask_weight", 0) > 0:
        images = batch["pixel_values"]
        masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        masks[:, : images.shape[-2] // 2, : images.shape[-1] // 2] = True
        batch["masks"] = masks
    return batch


def make_step(trainer, batch):
    """One optimizer step as ``Trainer.train`` runs it (the global step advances: ``masked_pass_every`` reads it)."""
    model = trainer.model
    batch = batch_for(trainer, batch)

    def step():
        trainer.training_step(model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1

    return step


def host_syncs(trainer, batch) -> int:
    """Operators in one ``training_step`` (forward and backward) that make the host wait on a GPU."""
    trainer.state.global_step = 0  # a step with the masked pass
    batch = batch_for(trainer, batch)  # built outside the audit: a data loader's work, not the step's
    with HostSyncAudit() as audit:
        trainer.training_step(trainer.model, batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    return audit.total


def interleaved_seconds(steps: dict, device, rounds: int, steps_per_round: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each function, per round; every round runs all of them, in a rotated order."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    labels = list(steps)
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[label]()
            synchronize(device)
            seconds[label].append((time.perf_counter() - start) / steps_per_round)
    return seconds


def isolated_peak_memory(case, overrides, reference_state, device, batch, output_dir) -> float:
    """Peak memory of one step of a variant built alone (nothing else on the device but the batch)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trainer = build_trainer(case, overrides, reference_state, device, output_dir)
    step = make_step(trainer, batch)
    step()  # the optimizer state exists from here on, as in training
    trainer.state.global_step = 0  # a step with the masked pass
    peak = peak_memory(step, device, resident_bytes(trainer, batch_for(trainer, batch)))
    del trainer, step
    gc.collect()
    return peak


def run_case(
    case: dict,
    device: torch.device,
    output_dir: str,
    rounds: int = 5,
    steps_per_round: int = 4,
    warmup: int = 2,
    variants: tuple = VARIANTS,
) -> dict:
    torch.manual_seed(0)
    reference_state = {k: v.clone() for k, v in case["build"]().state_dict().items()}  # host copy
    batch = {
        "pixel_values": torch.randn(case["batch"], *case["shape"], device=device),
        "labels": torch.randint(0, case["classes"], (case["batch"],), device=device),
    }
    settings = {PLAIN: None, **{label: overrides for label, overrides in variants}}
    trainers = {}
    for label, overrides in list(settings.items()):
        try:
            trainers[label] = build_trainer(case, overrides, reference_state, device, output_dir)
        except ValueError as error:  # a setting this model cannot take (B-cos on a ViT): said, not measured
            print(f"{case['name']}: {label} skipped: {error}", flush=True)
            del settings[label]
    width = next(t for t in trainers.values() if isinstance(t, SaliencyDecorTrainer)).sd_adapter.num_features
    steps = {label: make_step(trainer, batch) for label, trainer in trainers.items()}
    seconds = interleaved_seconds(steps, device, rounds, steps_per_round, warmup)
    # a step as training runs it (after the first batch's one-time label check)
    syncs = {label: host_syncs(trainer, batch) for label, trainer in trainers.items()}
    del trainers, steps
    memory = {
        label: isolated_peak_memory(case, o, reference_state, device, batch, output_dir)
        for label, o in settings.items()
    }
    rows = []
    for label in settings:
        ratios = [s / p for s, p in zip(seconds[label], seconds[PLAIN], strict=True)]
        rows.append(
            {
                "variant": label,
                "seconds": statistics.median(seconds[label]),
                "ratio": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "memory_ratio": memory[label] / memory[PLAIN],
                "host_syncs": syncs[label],
            }
        )
    whitening = whitening_costs(case, width, device, rounds, steps_per_round, warmup)
    plain_seconds = statistics.median(seconds[PLAIN])
    return {
        "case": case["name"],
        "batch": case["batch"],
        "num_features": width,
        "group_size": case["group_size"],
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "rows": rows,
        "whitening_seconds": whitening["seconds"],
        "whitening_host_syncs": whitening["host_syncs"],
        "whitening_share": {k: v / plain_seconds for k, v in whitening["seconds"].items()},
    }


def whitening_costs(case: dict, width: int, device, rounds: int, steps_per_round: int, warmup: int) -> dict:
    """The whitening + decorrelation loss alone (forward and backward), per method, interleaved."""
    features = torch.randn(case["batch"], width, device=device, requires_grad=True)
    calls = {}
    syncs = {}
    for label, method, compiled in WHITENINGS:
        whitening = GroupZCA(width, group_size=case["group_size"], method=method).to(device)
        loss_fn = compiled_whitened_decorrelation_loss() if compiled else whitened_decorrelation_loss

        def whiten_and_decorrelate(whitening=whitening, loss_fn=loss_fn):
            loss_fn(whitening, features).backward()

        whiten_and_decorrelate()  # compiles the compiled one before the audit
        with HostSyncAudit() as audit:
            whiten_and_decorrelate()
        syncs[label] = audit.total
        calls[label] = whiten_and_decorrelate
    seconds = interleaved_seconds(calls, device, rounds, steps_per_round, warmup)
    return {"seconds": {k: statistics.median(v) for k, v in seconds.items()}, "host_syncs": syncs}


def format_results(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    lines.append("| model (batch) | variant | step ms | × plain, median [range] | peak memory × plain | host syncs |")
    lines.append("|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            low, high = row["ratio_range"]
            lines.append(
                f"| {result['case']} ({result['batch']}) | {row['variant']} | {1000 * row['seconds']:.1f} "
                f"| {row['ratio']:.2f} [{low:.2f}–{high:.2f}] | {row['memory_ratio']:.2f} | {row['host_syncs']} |"
            )
    lines.append("")
    labels = [label for label, _, _ in WHITENINGS]
    lines.append(
        "| model | D | g | "
        + " | ".join(f"whitening + decorrelation, {label} (ms, share of plain step, host syncs)" for label in labels)
        + " |"
    )
    lines.append("|---|---|---|" + "---|" * len(labels))
    for result in results:
        ms, share, syncs = result["whitening_seconds"], result["whitening_share"], result["whitening_host_syncs"]
        cells = " | ".join(f"{1000 * ms[k]:.2f} ms, {100 * share[k]:.1f}%, {syncs[k]}" for k in labels)
        lines.append(f"| {result['case']} | {result['num_features']} | {result['group_size']} | {cells} |")
    lines.append("")
    lines.append(
        f"Ratios: per round of {results[0]['steps_per_round']} steps of every variant (order rotated), "
        f"{results[0]['rounds']} rounds; memory: each variant built alone."
        if results
        else ""
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized batches and fewer rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names (substring match)")
    parser.add_argument("--variants", nargs="*", default=None, help="subset of variant names (substring match)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of interleaved steps (default 5 quick, 10)")
    parser.add_argument("--bf16", action="store_true", help="every step under bf16 autocast (GPU)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds = args.rounds or (5 if args.quick else 10)
    warmup = 2 if args.quick else 5
    selected = [c for c in cases(args.quick) if not args.cases or any(s in c["name"] for s in args.cases)]
    for case in selected:
        case["bf16"] = args.bf16
        case["name"] += ", bf16" if args.bf16 else ""
    variants = tuple(v for v in VARIANTS if not args.variants or any(s in v[0] for s in args.variants)) or VARIANTS
    machine = machine_description(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in selected:  # the table and JSON after each case: a run cut short keeps what it measured
            results.append(run_case(case, device, tmp, rounds=rounds, warmup=warmup, variants=variants))
            print(format_results(results, machine), flush=True)
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
