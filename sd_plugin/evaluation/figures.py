"""Figures: saliency grids (paper Fig. 2/4), masking curves (Fig. 3), gradient box plots.

Needs matplotlib (``pip install 'sd-plugin[eval]'``). Every function writes a PNG and
returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from .masking_curve import MaskingCurve

__all__ = ["explanation_title", "saliency_grid", "masking_curves_figure", "gradient_boxplot"]

# What each named explanation draws, for titles (any other name is shown as it is).
_EXPLANATION_TITLES = {
    "gradient": "Loss-gradient saliency |dCE/dx|",
    "logit_gradient": "Logit-gradient saliency |dlogit_y/dx|",
    "integrated_gradients": "Integrated Gradients |IG| (zero baseline)",
    "smoothgrad": "SmoothGrad (mean |dlogit_y/dx| over noisy copies)",
    "input_x_gradient": "Input×Gradient x·dlogit_y/dx (signed, channel sum)",
    "gradcam": "Grad-CAM (last spatial feature map)",
    "native": "The model's own explanation",
    "random": "Random map (the reference order)",
}


def explanation_title(explanation: str) -> str:
    """The title of maps by ``explanation`` (an ``evaluate --attribution`` name or any label).

    Example:
        >>> explanation_title("integrated_gradients"), explanation_title("my occlusion")
        ('Integrated Gradients |IG| (zero baseline)', 'my occlusion')
    """
    return _EXPLANATION_TITLES.get(explanation, explanation)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("figures need matplotlib: pip install 'sd-plugin[eval]'") from error
    return plt


def _as_display_image(image: Tensor) -> tuple[Tensor, str | None]:
    image = image.detach().float().cpu()
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low + 1e-12)
    if image.shape[0] == 1:
        return image[0], "gray"
    return image.permute(1, 2, 0), None


def saliency_grid(
    images: Tensor,
    saliency: Mapping[str, Tensor],
    path: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    explanation: str = "gradient",
) -> Path:
    """Rows: images; columns: the image, then each model's saliency map (per-image scale).

    Args:
        images: ``(N, C, H, W)``.
        saliency: model name -> ``(N, H, W)`` saliency maps.
        path: output PNG.
        labels: optional caption per image (e.g. the class name).
        title: the figure's title (default: what ``explanation`` draws, ``explanation_title``).
        explanation: the explanation the maps are by (an ``evaluate --attribution`` name).
    """
    title = title or explanation_title(explanation)
    plt = _pyplot()
    names = list(saliency)
    rows, cols = images.shape[0], len(names) + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.9 * cols + 0.8, 1.9 * rows + 0.4), squeeze=False, constrained_layout=True
    )
    mappable = None
    for r in range(rows):
        picture, cmap = _as_display_image(images[r])
        axes[r][0].imshow(picture, cmap=cmap)
        axes[r][0].set_ylabel(labels[r] if labels else f"#{r}", fontsize=8)
        for c, name in enumerate(names, start=1):
            heat = saliency[name][r].detach().float().cpu()
            heat = heat / (heat.max() + 1e-12)
            mappable = axes[r][c].imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0)
    for c, name in enumerate(["input", *names]):
        axes[0][c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.6, label="saliency (per-image max = 1)")
    return _save(fig, plt, path)


def masking_curves_figure(
    curves: Mapping[str, Sequence[MaskingCurve]] | Mapping[str, MaskingCurve],
    path: str | Path,
    title: str | None = None,
    explanation: str = "gradient",
) -> Path:
    """Curves of several models on one axis; a dashed line for each random-order curve.

    The legend gives each curve's area (AUC): accuracy (%) integrated over pixels removed (%),
    in %·% (10000: 100 % accuracy at every level). ``explanation`` names the maps that ranked the pixels.
    """
    title = title or f"Accuracy as the most salient pixels are removed\n(ranked by {explanation_title(explanation)})"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, value) in enumerate(curves.items()):
        color = colors[index % len(colors)]
        for curve in value if isinstance(value, (list, tuple)) else [value]:
            style = "-" if curve.order == "saliency" else "--"
            label = f"{name} ({curve.order}, AUC {curve.auc:.0f} %·%)"
            ax.plot(curve.percentages, curve.accuracy, style, color=color, marker="o", markersize=3, label=label)
    ax.set_xlabel("pixels removed (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, title="AUC: area under accuracy (%) × removed (%), max 10000", title_fontsize=7)
    return _save(fig, plt, path)


def gradient_boxplot(
    saliency: Mapping[str, Tensor],
    path: str | Path,
    important_fraction: float = 0.25,
    title: str | None = None,
    explanation: str = "gradient",
) -> Path:
    """Box plots per model of normalised saliency on each image's top ``important_fraction``
    pixels versus the rest (paper Fig. 2, right).

    "Important" pixels are the image's own map's top ``important_fraction`` (the figure says so):
    the plot shows how concentrated each map is, not where the evidence is.
    """
    share = f"{important_fraction:.0%}"
    title = title or (
        f"{explanation_title(explanation)}: each image's top {share} pixels by its own map\n"
        f'("important") vs. the other {1 - important_fraction:.0%} ("other")'
    )
    plt = _pyplot()
    data, positions, tick_labels = [], [], []
    for index, (name, maps) in enumerate(saliency.items()):
        flat = maps.detach().float().cpu().flatten(1)
        flat = flat / (flat.amax(1, keepdim=True) + 1e-12)
        count = max(1, int(important_fraction * flat.shape[1]))
        ordered = flat.sort(dim=1, descending=True).values
        data += [ordered[:, :count].flatten().numpy(), ordered[:, count:].flatten().numpy()]
        positions += [3 * index + 1, 3 * index + 2]
        tick_labels += [f"{name}\nimportant (top {share})", f"{name}\nother"]
    fig, ax = plt.subplots(figsize=(1.6 * len(data) + 1.5, 4.2))
    ax.boxplot(data, positions=positions, showfliers=False)
    ax.set_xticks(positions)
    ax.set_xticklabels(tick_labels, fontsize=7)
    ax.set_ylabel("saliency / per-image max")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
