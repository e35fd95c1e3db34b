"""``TrainingLog``: what both front-ends do at a logging step, written once.

Between two logging steps it collects each batch's loss components on the device
(``MetricMeter``, no host read); at a logging step it first raises if a component became
non-finite (the step's device-side record, on every process at once), then averages the
components over the window and the processes, and warns once if the penultimate features
collapse (``CollapseMonitor``). The Trainer's ``log`` and the recipes' loop both call it.

Example:
    >>> import timm, torch
    >>> from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt
    >>> model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    >>> step = SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method="sgt"))
    >>> log = TrainingLog(step)
    >>> log.update(step.step(model, torch.randn(8, 3, 32, 32), torch.arange(8) % 3))
    >>> sorted(log.compute(global_step=1))
    ['live_features', 'loss', 'loss_ce', 'loss_kl', 'masked_accuracy']
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..utils.meter import MetricMeter
from .collapse import CollapseMonitor
from .training_step import SaliencyDecorOutput, SaliencyDecorStep

__all__ = ["TrainingLog"]


class TrainingLog:
    """The logging window of a training run (module docstring)."""

    def __init__(self, step: SaliencyDecorStep) -> None:
        self.step = step
        self.meter = MetricMeter()
        self.collapse_monitor = CollapseMonitor()

    def update(self, output: SaliencyDecorOutput) -> None:
        """Record one batch's components (on the device)."""
        self.meter.update(output.components())

    def compute(
        self, global_step: int, mean_over_processes: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float]:
        """The window's mean components (a collective with several processes); resets the window.

        Raises ``NonFiniteLossError`` first if a component was NaN/inf since the last logging step.
        """
        self.step.raise_if_nonfinite(step=global_step, across_processes=True)
        logs = self.meter.compute(mean_over_processes=mean_over_processes)
        self.collapse_monitor.check(logs, step=global_step)
        return logs
