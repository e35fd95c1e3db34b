"""Cost of a SaliencyDecorTrainer step relative to a plain transformers.Trainer step.

Same model weights, same batch, side by side in one run: median step time (forward,
backward(s), optimizer step) after warm-up, the ratio to the plain step, the peak-memory
ratio (CUDA allocator; on CPU the profiler's allocation events plus the resident weights,
optimizer state and batch), the operators in the step that make the host wait for a GPU
(counted on any device by ``common.HostSyncAudit``), and the share of the whitening +
decorrelation in the plain step.

    python benchmarks/step_cost.py --quick            # CPU size
    python benchmarks/step_cost.py                    # full size (GPU)

Targets (DESIGN.md §6): step <= 2.1x plain, memory <= 1.15x, whitening+decor <= 5%.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import HostSyncAudit, machine_description, median_seconds, peak_memory, tensor_bytes  # noqa: E402

from sd_plugin import GroupZCA, SaliencyDecorConfig, SaliencyDecorTrainer, decorrelation_loss  # noqa: E402
from sd_plugin.decorrelation import compiled_decorrelation_loss  # noqa: E402
from sd_plugin.models import PaperCNN  # noqa: E402

VARIANTS = (
    ("baseline", {"method": "baseline"}),
    ("sgt", {"method": "sgt"}),
    ("sgt (random masks)", {"method": "sgt", "mask_selection": "random"}),
    ("decor", {"method": "decor"}),
    ("saliencydecor", {"method": "saliencydecor"}),
    ("saliencydecor (both)", {"method": "saliencydecor", "consistency_grad": "both"}),
    ("saliencydecor (newton_schulz)", {"method": "saliencydecor", "whitening_method": "newton_schulz"}),
    ("saliencydecor (compiled whitening)", {"method": "saliencydecor", "whitening_compile": True}),
    ("saliencydecor (check_finite)", {"method": "saliencydecor", "check_finite": True}),
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


def cases(quick: bool) -> list[dict]:
    return [
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


def host_syncs(trainer, batch) -> int:
    """Operators in one ``training_step`` (forward and backward) that make the host wait on a GPU."""
    with HostSyncAudit() as audit:
        trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.zero_grad(set_to_none=True)
    return audit.total


def make_step(trainer, batch):
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the step reads it
    model = trainer.model

    def step():
        trainer.training_step(model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def run_case(case: dict, device: torch.device, warmup: int, repeats: int, output_dir: str) -> dict:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    reference = case["build"]().to(device)
    batch = {
        "pixel_values": torch.randn(case["batch"], *case["shape"], device=device),
        "labels": torch.randint(0, case["classes"], (case["batch"],), device=device),
    }
    common = dict(output_dir=output_dir, report_to="none", use_cpu=device.type == "cpu", learning_rate=1e-4)
    plain_trainer = Trainer(model=copy.deepcopy(reference), args=TrainingArguments(**common))
    plain_step = make_step(plain_trainer, batch)
    plain_time = median_seconds(plain_step, device, warmup, repeats)
    plain_memory = peak_memory(plain_step, device, resident_bytes(plain_trainer, batch))
    rows = [
        {
            "variant": "plain Trainer",
            "seconds": plain_time,
            "ratio": 1.0,
            "memory_ratio": 1.0,
            "host_syncs": host_syncs(plain_trainer, batch),
        }
    ]
    for label, overrides in VARIANTS:
        settings = {"group_size": case["group_size"], "check_finite": False, **overrides}
        args = SaliencyDecorConfig(**common, **settings)
        trainer = SaliencyDecorTrainer(model=copy.deepcopy(reference), args=args)
        step = make_step(trainer, batch)
        seconds = median_seconds(step, device, warmup, repeats)
        memory = peak_memory(step, device, resident_bytes(trainer, batch))
        rows.append(
            {
                "variant": label,
                "seconds": seconds,
                "ratio": seconds / plain_time,
                "memory_ratio": memory / plain_memory,
                "host_syncs": host_syncs(trainer, batch),
            }
        )
    width = trainer.sd_adapter.num_features
    features = torch.randn(case["batch"], width, device=device, requires_grad=True)
    whitening_seconds = {}
    for label, method, compiled in (
        ("eigh", "eigh", False),
        ("newton_schulz", "newton_schulz", False),
        ("eigh compiled", "eigh", True),
    ):
        whitening = GroupZCA(width, group_size=case["group_size"], method=method, compiled=compiled).to(device)
        loss_fn = compiled_decorrelation_loss() if compiled else decorrelation_loss

        def whiten_and_decorrelate(whitening=whitening, loss_fn=loss_fn):
            loss_fn(whitening(features)).backward()

        whitening_seconds[label] = median_seconds(whiten_and_decorrelate, device, warmup, repeats)
    return {
        "case": case["name"],
        "batch": case["batch"],
        "num_features": width,
        "group_size": case["group_size"],
        "rows": rows,
        "whitening_seconds": whitening_seconds,
        "whitening_share": {k: v / plain_time for k, v in whitening_seconds.items()},
    }


def format_results(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    lines.append("| model (batch) | variant | step ms | × plain | peak memory × plain | host syncs |")
    lines.append("|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['case']} ({result['batch']}) | {row['variant']} | {1000 * row['seconds']:.1f} "
                f"| {row['ratio']:.2f} | {row['memory_ratio']:.2f} | {row['host_syncs']} |"
            )
    lines.append("")
    lines.append(
        "| model | D | g | whitening + decorrelation (fwd+bwd): eigh | share | Newton–Schulz (15 it.) | share "
        "| eigh, compiled | share |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        ms, share = result["whitening_seconds"], result["whitening_share"]
        cells = " | ".join(
            f"{1000 * ms[k]:.2f} ms | {100 * share[k]:.1f}%" for k in ("eigh", "newton_schulz", "eigh compiled")
        )
        lines.append(f"| {result['case']} | {result['num_features']} | {result['group_size']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized batches and fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names (substring match)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    warmup, repeats = (2, 5) if args.quick else (5, 20)
    selected = [c for c in cases(args.quick) if not args.cases or any(s in c["name"] for s in args.cases)]
    machine = machine_description(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in selected:  # the table and JSON after each case: a run cut short keeps what it measured
            results.append(run_case(case, device, warmup, repeats, tmp))
            print(format_results(results, machine), flush=True)
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
