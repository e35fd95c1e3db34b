"""``MetricMeter``: the per-logging-window averages both training loops report.

Values stay on the device until ``compute`` (no host sync per step). Two kinds of metric:
means of per-step values (the loss components) and ratios of sums (accuracy: correct /
seen, exact whatever the batch sizes).

Example:
    >>> import torch
    >>> from sd_plugin.utils.meter import MetricMeter
    >>> meter = MetricMeter()
    >>> meter.update({"loss": torch.tensor(1.0)}); meter.update({"loss": torch.tensor(3.0)})
    >>> meter.update_ratio("accuracy", torch.tensor(3), torch.tensor(4))
    >>> meter.update_ratio("accuracy", torch.tensor(0), torch.tensor(1))
    >>> meter.compute()
    {'loss': 2.0, 'accuracy': 0.6}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["MetricMeter"]

Reduce = Callable[[Tensor], Tensor]


class MetricMeter:
    """Accumulates scalar metrics between two logging steps (or over one evaluation)."""

    def __init__(self) -> None:
        self._values: dict[str, list[Tensor]] = {}
        self._ratios: dict[str, tuple[Tensor, int | Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self._values or self._ratios)

    def update(self, values: dict[str, Tensor]) -> None:
        """Record one step's value of each metric (averaged over the steps by ``compute``)."""
        for name, value in values.items():
            self._values.setdefault(name, []).append(value.detach())

    def update_ratio(self, name: str, numerator: Tensor, denominator: int | Tensor) -> None:
        """Add to a ratio metric's numerator (summed on its device) and denominator (``compute``: sum / sum)."""
        total, count = self._ratios.get(name, (0, 0))
        self._ratios[name] = (total + numerator.detach(), count + denominator)

    def compute(self, mean_over_processes: Reduce | None = None, sum_over_processes: Reduce | None = None) -> dict:
        """The metrics as floats (means across processes, ratios of sums across processes); resets the meter."""
        results: dict[str, float] = {}
        for name, values in self._values.items():
            mean = torch.stack(values).float().mean()
            results[name] = float(mean_over_processes(mean) if mean_over_processes else mean)
        for name, (total, count) in self._ratios.items():
            dtype = torch.float32 if total.device.type == "mps" else torch.float64  # MPS has no float64
            totals = torch.stack([total.to(dtype), torch.as_tensor(count, device=total.device).to(dtype)])
            totals = sum_over_processes(totals) if sum_over_processes else totals
            if float(totals[1]) > 0:
                results[name] = float(totals[0] / totals[1])
        self.reset()
        return results

    def reset(self) -> None:
        self._values.clear()
        self._ratios.clear()
