"""Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading top-down.

The layers with parameters are re-initialised from the output towards the input, one more
at each point, and the saliency of the randomised copy is compared with the trained
model's by Spearman rank correlation (mean over images). A faithful explanation decays
towards 0 as layers are randomised; a map that stays correlated does not depend on what
the model learned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attribution import saliency_maps

__all__ = ["RandomizationCheck", "parameter_randomization", "spearman"]


def _ranks(values: Tensor) -> Tensor:
    """Average ranks per row (ties share the mean of their positions, as ``scipy.stats.rankdata``)."""
    ordered, order = values.sort(dim=1, stable=True)
    length = values.shape[1]
    positions = torch.arange(length, dtype=torch.float64, device=values.device).expand_as(ordered)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1  # tie-group index of each sorted position
    first = torch.zeros_like(positions).scatter_reduce_(1, group, positions, "amin", include_self=False)
    last = torch.zeros_like(positions).scatter_reduce_(1, group, positions, "amax", include_self=False)
    average = ((first + last) / 2).gather(1, group)
    ranks = torch.empty_like(average)
    ranks.scatter_(1, order, average)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of two ``(B, N)`` tensors: ``(B,)``, as ``scipy.stats.spearmanr``.

    Ties get average ranks; a constant row has no defined correlation and gives NaN (as scipy).

    Example:
        >>> a = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
        >>> b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
        >>> [round(v, 4) for v in spearman(a, b).tolist()[:1]], bool(spearman(a, b)[1].isnan())
        ([0.7746], True)
    """
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(denominator > 0, (ra * rb).sum(1) / denominator.clamp_min(1e-300), float("nan"))


@dataclass
class RandomizationCheck:
    """``correlations[k]``: mean Spearman correlation after randomising ``layers[:k]``."""

    layers: list[str]
    correlations: list[float]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "correlations": self.correlations}


def _parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    ]


@torch.no_grad()
def _reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    if hasattr(module, "reset_parameters"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            module.reset_parameters()
        return
    for parameter in module.parameters(recurse=False):
        parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.02)


def parameter_randomization(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    points: int | None = 8,
    attribution: str = "gradient",
    seed: int = 0,
) -> RandomizationCheck:
    """Cascading top-down randomisation; ``points`` depths evenly spread (``None``: every layer).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> check = parameter_randomization(model, torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
        >>> check.correlations[0]
        1.0
    """
    from .model_fn import evaluation_mode

    with evaluation_mode(model):
        return _cascading_randomization(model, images, labels, points, attribution, seed)


def _cascading_randomization(model, images, labels, points, attribution, seed) -> RandomizationCheck:
    model.eval()
    reference = saliency_maps(model, images, labels, attribution).flatten(1)
    layers = list(reversed(_parameter_layers(model)))
    if not layers:
        raise ValueError("the model has no parameters to randomise.")
    depths = list(range(len(layers) + 1))
    if points is not None and points < len(depths):
        step = (len(depths) - 1) / max(1, points - 1)
        depths = sorted({round(i * step) for i in range(points)})
    generator = torch.Generator().manual_seed(seed)
    randomized = copy.deepcopy(model).eval()
    copies = dict(_parameter_layers(randomized))
    done = 0
    names, correlations = [], []
    for depth in depths:
        while done < depth:
            _reinitialise(copies[layers[done][0]], generator)
            done += 1
        current = saliency_maps(randomized, images, labels, attribution).flatten(1)
        names.append(layers[depth - 1][0] if depth else "(none)")
        correlations.append(float(spearman(reference, current).nanmean()))  # constant maps have no rank
    return RandomizationCheck(names, correlations)
