"""``NonFiniteWatch``: non-finite loss components recorded on the device, read when training logs or saves.

Checking ``bool(loss.isfinite())`` at every step makes the host wait for the device (on a GPU
the queue drains each time). The watch instead keeps, per component, the first training batch
at which it was NaN or infinite, in a small device tensor (a few kernels per step, no read);
``raise_if_nonfinite`` reads it once. The Trainer and the recipes call it at each logging step,
before writing any checkpoint and when training ends, so a non-finite run stops with an error
naming the component and the step range, and no checkpoint is written from a non-finite state.

Example:
    >>> import torch
    >>> watch = NonFiniteWatch(("loss_ce", "loss_kl"))
    >>> watch.record({"loss_ce": torch.tensor(1.0), "loss_kl": torch.tensor(0.5)}, batch=1)
    >>> watch.raise_if_nonfinite(step=1)  # all finite: returns
    >>> watch.record({"loss_ce": torch.tensor(float("nan")), "loss_kl": None}, batch=2)
    >>> watch.raise_if_nonfinite(step=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sd_plugin.utils.errors.NonFiniteLossError: non-finite loss component loss_ce (first at training batch 2), ...
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .distributed import max_over_processes
from .errors import NonFiniteLossError

__all__ = ["NonFiniteWatch"]


class NonFiniteWatch:
    """Records non-finite scalars without a host read; ``raise_if_nonfinite`` reads them (module docstring).

    Args:
        names: the components watched, in a fixed order.
        advice: appended to the error (what to change).
    """

    def __init__(self, names: Sequence[str], advice: str = "") -> None:
        self.names = tuple(names)
        self.advice = advice
        self._first_bad: Tensor | None = None  # (len(names),) int64 batch numbers, -1 while finite
        self.last_clean_step: int | None = None

    def record(self, values: dict[str, Tensor | None], batch: int) -> None:
        """Note which of ``values`` (scalars; ``None``: absent this batch) are not finite. No host read."""
        present = [values.get(name) for name in self.names]
        reference = next((value for value in present if value is not None), None)
        if reference is None:
            return
        zero = reference.new_zeros((), dtype=torch.float32)
        stacked = torch.stack([zero if value is None else value.detach().float() for value in present])
        bad = ~torch.isfinite(stacked)
        if self._first_bad is None:
            self._first_bad = torch.full((len(self.names),), -1, dtype=torch.long, device=reference.device)
        self._first_bad = torch.where(bad & (self._first_bad < 0), batch, self._first_bad)

    def raise_if_nonfinite(self, step: int | None = None, across_processes: bool = False) -> None:
        """Raise ``NonFiniteLossError`` if a recorded value was not finite (one host read); else note ``step`` clean.

        ``across_processes``: raise on every ``torch.distributed`` process when any recorded one (a
        collective: all processes must call it at the same point; one process raising alone would
        leave the others waiting in their next collective).
        """
        if self._first_bad is not None:
            first_bad = max_over_processes(self._first_bad) if across_processes else self._first_bad
            first = first_bad.tolist()
            bad = {name: batch for name, batch in zip(self.names, first, strict=True) if batch >= 0}
            if bad:
                raise NonFiniteLossError(self._message(bad, step))
        self.last_clean_step = step

    def reset(self) -> None:
        """Forget what was recorded (a new run)."""
        self._first_bad = None
        self.last_clean_step = None

    def _message(self, bad: dict[str, int], step: int | None) -> str:
        components = ", ".join(f"{name} (first at training batch {batch})" for name, batch in bad.items())
        noun = "component" if len(bad) == 1 else "components"
        since = "the start" if self.last_clean_step is None else f"step {self.last_clean_step}"
        where = f", between {since} and step {step}" if step is not None else ""
        saved = "" if self.last_clean_step is None else f" after step {self.last_clean_step}"
        message = f"non-finite loss {noun} {components}{where}: training stopped; no checkpoint was written{saved}."
        return f"{message} {self.advice}".rstrip()
