"""The two-process checks, in one ``torchrun`` launch (each launch pays ~8 s of imports per process).

    torchrun --nproc_per_node 2 tests/two_processes.py RESULTS.json recipes/tiny_imagenet.py --model ...

runs, on 2 CPU processes: the recipe with the flags after ``RESULTS.json`` (its own output folder
holds what it wrote), then the Trainer three ways (plain ``Trainer``, SGT, SaliencyDecor; all-reduces
and final weights) and the SaliencyDecor one's ``push_to_hub`` (to ``HF_ENDPOINT``: the test's
loopback Hub), then the two-pass step on a DDP model (all-reduces counted with and without
``no_sync``). Rank 0 writes the counts, weights and each rank's push to ``RESULTS.json``. ``tests/test_recipes.py``
compares them with one process, which it runs in-process through the same functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

TESTS = Path(__file__).resolve().parent
_RECIPES: dict[Path, object] = {}


def run_recipe(argv: list) -> dict:
    """``main(argv)`` of the recipe ``argv[0]`` names (a path from the repository root); its results."""
    script = TESTS.parent / argv[0]
    if script not in _RECIPES:
        spec = importlib.util.spec_from_file_location(f"recipe_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        _RECIPES[script] = module
    return _RECIPES[script].main([str(arg) for arg in argv[1:]])


@contextlib.contextmanager
def counted_all_reduces() -> Iterator[list[int]]:
    """A list that grows by one per bucket all-reduce of every DDP model built inside the block."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    calls: list[int] = []
    original_init = DistributedDataParallel.__init__

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def hook(process_group, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(process_group, bucket)

        self.register_comm_hook(self.process_group, hook)

    DistributedDataParallel.__init__ = counting_init
    try:
        yield calls
    finally:
        DistributedDataParallel.__init__ = original_init


def step_all_reduces() -> dict[str, int]:
    """One two-pass SaliencyDecor step on a DDP model: all-reduces with the step's ``no_sync``, and without."""
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(TESTS))
    import tiny_models

    from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt

    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    arguments = SaliencyDecorArguments(method="saliencydecor", group_size=8, sync_whitening=True, mask_fill="mean")
    objective = SaliencyDecorStep(adapt(model, feature_layer="body"), arguments)
    with counted_all_reduces() as calls:
        ddp = DistributedDataParallel(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    objective.step(ddp, x, y)  # the step finds the DDP model's no_sync itself
    with_no_sync = len(calls)
    calls.clear()
    ddp.zero_grad()
    objective.step(ddp, x, y, no_sync=contextlib.nullcontext)  # no suppression: the clean backward reduces too
    return {"with_no_sync": with_no_sync, "without": len(calls)}


class Net(nn.Module):
    """No BatchNorm: 2 processes x 4 images train exactly as 1 process x 8."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.Tanh()
        )
        self.out = nn.Linear(16, 3)

    def forward(self, pixel_values, labels=None):  # a plain Trainer reads the loss from the output
        logits = self.out(self.body(pixel_values))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def trainer_runs(world_size: int, root: Path, push_to: str | None = None) -> dict[str, dict]:
    """Two SGD steps on 8 images, as a plain ``Trainer``, SGT and SaliencyDecor: all-reduces and final weights.

    Each run's ``output_dir`` is ``root/NAME`` (one folder for all processes, as a multi-GPU run has);
    with ``push_to`` the SaliencyDecor run then calls ``push_to_hub`` to that repository, and
    ``"push"`` says what it returned and whether the exported folder was complete when it did."""
    from transformers import Trainer, TrainingArguments

    from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 12, 12, generator=g), torch.arange(8) % 3
    data = [{"pixel_values": x[i], "labels": int(y[i])} for i in range(8)]
    common = dict(
        per_device_train_batch_size=8 // world_size,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    results = {}
    for name, method in (("plain", None), ("sgt", "sgt"), ("saliencydecor", "saliencydecor")):
        torch.manual_seed(0)
        output_dir = root / name
        if method is None:
            trainer = Trainer(model=Net(), args=TrainingArguments(output_dir=output_dir, **common), train_dataset=data)
        else:
            method_fields = dict(method=method, mask_fill="mean", group_size=8, feature_layer="body")
            args = SaliencyDecorConfig(output_dir=output_dir, hub_model_id=push_to, **method_fields, **common)
            trainer = SaliencyDecorTrainer(model=Net(), args=args, train_dataset=data)
        with counted_all_reduces() as calls:
            trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
        results[name] = {"all_reduces": len(calls), "weights": weights}
    if push_to is not None:
        url = trainer.push_to_hub()  # the SaliencyDecor run's
        results["push"] = {"url": url, "export_complete": (root / "saliencydecor" / "export" / "README.md").is_file()}
    return results


def main(results_file: str, recipe_argv: list[str]) -> None:
    run_recipe(recipe_argv)  # its Accelerator starts the process group the other two checks use
    world_size = torch.distributed.get_world_size()
    trainers = trainer_runs(world_size, Path(results_file).parent / "trainer", push_to="alice/two-processes")
    pushes = [None] * world_size
    torch.distributed.all_gather_object(pushes, trainers.pop("push"))
    results = {"world_size": world_size, "step": step_all_reduces(), "trainer": trainers, "push_by_rank": pushes}
    if torch.distributed.get_rank() == 0:
        Path(results_file).write_text(json.dumps(results))
    torch.distributed.barrier()  # a clean shutdown: gloo threads alive at exit abort the process
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    assert int(os.environ.get("WORLD_SIZE", "1")) == 2, "run under torchrun --nproc_per_node 2"
    main(sys.argv[1], sys.argv[2:])
