"""Model card rendering: YAML metadata (``huggingface_hub.ModelCardData``) + the template in ``hub/``.

Example:
    >>> card = render_model_card(
    ...     model_name="resnet-sd", library_name="transformers", metadata={"method": "saliencydecor"},
    ...     evaluation={"accuracy": 97.5, "masking_auc": 3900.0, "masking_auc_random": 5400.0,
    ...                 "faithfulness_gap": 0.28},
    ...     datasets=["digits"])
    >>> from huggingface_hub import ModelCard
    >>> data = ModelCard(card).data
    >>> data.library_name, "saliencydecor" in data.tags, data.eval_results[0].metric_type
    ('transformers', True, 'accuracy')
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from ..core.arguments import SETTING_FIELDS
from ..core.families import REPO_ID_PLACEHOLDER
from ..evaluation.metrics import METRICS

__all__ = ["METRIC_LABELS", "REPO_ID_PLACEHOLDER", "evaluation_for_card", "render_model_card"]

# The card's metric rows, from the evaluation's one registry (key -> (key, description)).
METRIC_LABELS = {key: (key, metric.description) for key, metric in METRICS.items()}


def _template() -> Template:
    text = resources.files("sd_plugin.hub").joinpath("model_card.md").read_text(encoding="utf-8")
    return Template(text)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _evaluation_table(evaluation: dict[str, Any] | None, comparisons: dict[str, dict[str, Any]]) -> str:
    if not evaluation:
        return "Not evaluated yet: run `python -m sd_plugin evaluate` and export again with `--evaluation`."
    rows = {"this model": evaluation, **comparisons}
    keys = [k for k in METRIC_LABELS if any(k in r for r in rows.values())]
    lines = ["| metric | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for key in keys:
        cells = [_format(r[key]) if key in r else "–" for r in rows.values()]
        lines.append(f"| {METRIC_LABELS[key][1]} | " + " | ".join(cells) + " |")
    source = evaluation.get("num_images")
    explanation = evaluation.get("attribution")
    if source or explanation:
        lines.append("")
        measured = f"Measured on {source} images" if source else "Measured"
        of = f" of the explanation `{explanation}` (every map-based number is for it)" if explanation else ""
        lines.append(f"{measured}{of} with `python -m sd_plugin evaluate` (command below).")
    return "\n".join(lines)


_PACKAGE = "[sd-plugin](https://pypi.org/project/sd-plugin/)"
_MASKING = (
    "a KL consistency between predictions on each image and on a copy whose least-salient pixels "
    "(by input gradient) are masked"
)
_DECORRELATION = "a group-wise ZCA whitening / decorrelation term on the penultimate features"
METHOD_DESCRIPTIONS = {
    "saliencydecor": f"This model was fine-tuned with **SaliencyDecor** ({_PACKAGE}): cross-entropy, {_MASKING}, "
    f"and {_DECORRELATION}.",
    "sgt": f"This model was fine-tuned with **saliency-guided training** (SGT, the masking half of SaliencyDecor; "
    f'{_PACKAGE} `method="sgt"`): cross-entropy and {_MASKING}.',
    "decor": f"This model was fine-tuned with cross-entropy and {_DECORRELATION} (the decorrelation half of "
    f'SaliencyDecor; {_PACKAGE} `method="decor"`).',
    "baseline": f'This model was fine-tuned with plain cross-entropy ({_PACKAGE} `method="baseline"`), the '
    "reference the other methods are compared with.",
}


def render_model_card(
    model_name: str,
    library_name: str,
    metadata: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    comparisons: dict[str, dict[str, Any]] | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    figures: list[str] | None = None,
    usage: str = "",
    training_command: str | None = None,
    evaluation_command: str | None = None,
    dataset_name: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
) -> str:
    """The full ``README.md`` text (YAML front matter + body) of an exported model.

    ``language`` and ``tags`` go to the metadata (``tags`` after the package's own).

    ``datasets`` / ``dataset_name`` that are local paths stay out of the metadata (they are no Hub
    dataset) and are named in the text; ``license`` (an SPDX-style Hub id such as ``apache-2.0``)
    defaults to ``other``, with a line saying it was not stated.
    """
    from huggingface_hub import EvalResult, ModelCardData

    comparisons = comparisons or {}
    local = [name for name in [*(datasets or []), dataset_name] if name and is_local_path(name)]
    datasets = [name for name in datasets or [] if not is_local_path(name)]
    dataset_name = None if dataset_name and is_local_path(dataset_name) else dataset_name
    eval_results = []
    if evaluation:
        for key, (metric_type, metric_name) in METRIC_LABELS.items():
            value = evaluation.get(key)
            if isinstance(value, (int, float)) and value == value:  # NaN (e.g. no ground truth) is no result
                eval_results.append(
                    EvalResult(
                        task_type="image-classification",
                        dataset_type=dataset_name or (datasets[0] if datasets else "custom"),
                        dataset_name=dataset_name or (datasets[0] if datasets else "custom"),
                        metric_type=metric_type,
                        metric_name=metric_name,
                        metric_value=float(evaluation[key]),
                    )
                )
    data = ModelCardData(
        model_name=model_name,
        library_name=library_name,
        pipeline_tag="image-classification",
        license=license or "other",
        language=language,
        tags=list(
            dict.fromkeys(["saliencydecor", "interpretability", "image-classification", "sd-plugin", *(tags or [])])
        ),
        datasets=datasets or None,
        base_model=base_model,
        metrics=[result.metric_type for result in eval_results] or None,
        eval_results=eval_results or None,
    )
    method = metadata.get("method", "saliencydecor")
    method_description = METHOD_DESCRIPTIONS.get(method, METHOD_DESCRIPTIONS["saliencydecor"])
    if metadata.get("mask_selection") == "random" and method in ("sgt", "saliencydecor"):
        method_description += (
            " **Control run:** the masked pixels were drawn uniformly at random per image "
            '(`mask_selection="random"`), not chosen by saliency.'
        )
    method_description += _input_gradient_terms(metadata)
    folded = metadata.get("whiten_head_input") and method in ("decor", "saliencydecor")
    inference_note = (
        "The whitening fed the classifier during training; it has been folded into the head's weight and "
        "bias, so this checkpoint is the plain architecture with no inference overhead."
        if folded
        else "The whitening only fed the decorrelation loss, so inference is the plain architecture."
        if method in ("decor", "saliencydecor")
        else "Inference is the plain architecture."
    )
    hyperparameters = "\n".join(f"| `{k}` | {_format(metadata[k])} |" for k in SETTING_FIELDS if k in metadata)
    figure_lines = "\n\n".join(f"![{name}]({name})" for name in figures or [])
    training = []
    if training_command:
        training.append(f"Trained with:\n\n```bash\n{training_command}\n```")
    if evaluation_command:
        training.append(f"Evaluated with:\n\n```bash\n{evaluation_command}\n```")
    if local:
        names = ", ".join(f"`{Path(name).name}`" for name in dict.fromkeys(local))
        training.append(f"Data: a local dataset ({names}), not on the Hub.")
    if not license:
        training.append(
            "License: not stated by the exporter (`license: other`); set it with `export(..., license=...)` "
            "(`--license`), usually the base model's."
        )
    body = _template().substitute(
        summary=f"# {model_name}\n\nAn image classifier trained with sd-plugin (`method={method}`), the "
        "SaliencyDecor paper's objective for more faithful gradient saliency (see Limitations for what the "
        "controls found).",
        method_description=method_description,
        inference_note=inference_note,
        hyperparameters=hyperparameters or "| method | " + method + " |",
        evaluation=_evaluation_table(evaluation, comparisons),
        figures=figure_lines,
        usage=usage,
        training="\n\n".join(training) or "Trained with `sd_plugin.SaliencyDecorTrainer`.",
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def is_local_path(name: str) -> bool:
    """True for a dataset / model name that is a path on this machine rather than a Hub id.

    Example:
        >>> is_local_path("/data/photos"), is_local_path("./data"), is_local_path("cifar10"), is_local_path("a/b")
        (True, True, False, False)
    """
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def evaluation_for_card(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, Any] | None:
    """Training-time evaluation metrics (``eval_accuracy`` a fraction...) as the card shows them (accuracy in %).

    The one mapping both front-ends use (the Trainer's last evaluation log, the recipes' results).

    Example:
        >>> evaluation_for_card({"eval_accuracy": 0.75, "eval_loss": 0.5, "epoch": 2})
        {'accuracy': 75.0, 'loss': 0.5}
    """
    evaluation = {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
    if "accuracy" in evaluation:
        evaluation["accuracy"] = 100.0 * evaluation["accuracy"]
    return evaluation or None


def _input_gradient_terms(metadata: dict[str, Any]) -> str:
    """The card's sentences for the input-gradient training terms that were on (none when all were off).

    Example:
        >>> _input_gradient_terms({"adversarial_epsilon": 0.1, "adversarial_norm": "l2", "adversarial_steps": 1})
        ' It was trained on adversarial inputs: l2 PGD, epsilon 0.1, 1 step(s) (`adversarial_epsilon`).'
    """
    sentences = []
    if metadata.get("adversarial_epsilon"):
        sentences.append(
            f"It was trained on adversarial inputs: {metadata.get('adversarial_norm', 'linf')} PGD, epsilon "
            f"{metadata['adversarial_epsilon']:g}, {metadata.get('adversarial_steps', 1)} step(s) "
            "(`adversarial_epsilon`)."
        )
    if metadata.get("input_gradient_weight"):
        sentences.append(
            f"Its loss penalised the input-gradient norm, weight {metadata['input_gradient_weight']:g} "
            f"({metadata.get('input_gradient_mode', 'double_backprop')}; `input_gradient_weight`)."
        )
    if metadata.get("explanation_mask_weight"):
        sentences.append(
            "Its loss penalised input gradients outside annotated object masks (right for the right reasons), "
            f"weight {metadata['explanation_mask_weight']:g} (`explanation_mask_weight`)."
        )
    return "".join(" " + sentence for sentence in sentences)
