import json
from pathlib import Path

import pytest
import tiny_models
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sd_plugin.evaluation import faithfulness_gap, masking_auc, masking_curve
from sd_plugin.evaluation.attribution import saliency_maps
from sd_plugin.evaluation.deletion_insertion import deletion_insertion, rise_auc
from sd_plugin.evaluation.masking_curve import pixel_ranks, remove_top_pixels
from sd_plugin.evaluation.randomization import parameter_randomization, spearman
from sd_plugin.evaluation.representation import effective_rank
from sd_plugin.evaluation.sparseness import sparseness


class PixelZero(nn.Module):
    """Class 1 iff pixel 0 is bright: saliency is exactly one-hot on pixel 0."""

    def forward(self, x):
        score = 10.0 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def small_cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6 * 36, 4),
        )
        .to(dtype)
        .eval()
    )


def loader(n=12, seed=0, dtype=torch.float64, batch_size=5):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)),
        batch_size=batch_size,
    )


def test_masking_curve__hand_computed_toy_model():
    images = torch.ones(4, 1, 2, 2)
    data = DataLoader(TensorDataset(images, torch.ones(4, dtype=torch.long)), batch_size=4)
    curve = masking_curve(PixelZero(), data, percentages=[0, 25, 50, 75, 100], fill="zero")
    assert curve.accuracy == [100.0, 0.0, 0.0, 0.0, 0.0]  # pixel 0 is removed first
    assert curve.auc == 25 * (100 + 0) / 2
    assert curve.normalized_auc == pytest.approx(0.125)
    # Same curve against RISE's auc formula on the same points (fractions, probabilities in [0, 1]).
    assert curve.normalized_auc == pytest.approx(rise_auc([a / 100 for a in curve.accuracy]))


def test_masking_auc__matches_rise_auc_on_equal_steps():
    accuracy = [98.0, 90.0, 71.5, 40.0, 22.0, 10.0]
    percentages = [0, 20, 40, 60, 80, 100]
    assert masking_auc(percentages, accuracy) / 10000 == pytest.approx(rise_auc([a / 100 for a in accuracy]))


def test_remove_top_pixels__0_keeps_and_100_replaces_everything():
    images = torch.randn(3, 2, 5, 5)
    ranks = pixel_ranks(torch.rand(3, 5, 5))
    fill = torch.full_like(images, 7.0)
    assert torch.equal(remove_top_pixels(images, ranks, 0, fill), images)
    assert torch.equal(remove_top_pixels(images, ranks, 100, fill), fill)
    removed = remove_top_pixels(images, ranks, 40, fill) == 7.0
    assert (removed[:, 0].flatten(1).sum(1) == 10).all()


def naive_masking_curve(model, data, percentages, fill="mean", least_salient_first=False):
    correct = [0] * len(percentages)
    total = 0
    for images, labels in data:
        for x, y in zip(images, labels, strict=True):
            x = x.unsqueeze(0).clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(x), y.view(1))
            (grad,) = torch.autograd.grad(loss, x)
            saliency = grad.abs().mean(1).flatten()
            order = (-saliency if least_salient_first else saliency).argsort(descending=True, stable=True).tolist()
            mean = x.detach().mean((2, 3), keepdim=True).expand_as(x)
            for i, p in enumerate(percentages):
                masked = x.detach().clone().view(1, x.shape[1], -1)
                count = int(round(p / 100 * len(order)))
                for pixel in order[:count]:
                    masked[0, :, pixel] = mean.reshape(1, x.shape[1], -1)[0, :, pixel]
                prediction = model(masked.view_as(x)).argmax(-1).item()
                correct[i] += int(prediction == y.item())
            total += 1
    return [100.0 * c / total for c in correct]


@pytest.mark.parametrize("seed", [0, 1])
def test_masking_curve__batched_equals_naive_per_image_loop(seed):
    model, data = small_cnn(seed), loader(seed=seed)
    percentages = [0, 10, 30, 50, 70, 100]
    batched = masking_curve(model, data, percentages=percentages, max_batch_size=7)
    assert batched.accuracy == naive_masking_curve(model, data, percentages)


@pytest.mark.parametrize("seed", [0, 1])
def test_masking_curve__least_salient_first_equals_naive_loop(seed):
    model, data = small_cnn(seed), loader(seed=seed)
    percentages = [0, 10, 30, 50, 70, 100]
    lerf = masking_curve(model, data, percentages=percentages, order="least_salient", max_batch_size=7)
    assert lerf.accuracy == naive_masking_curve(model, data, percentages, least_salient_first=True)


def test_masking_curve__least_salient_first_keeps_the_one_pixel_that_matters():
    images = torch.ones(4, 1, 2, 2)
    data = DataLoader(TensorDataset(images, torch.ones(4, dtype=torch.long)), batch_size=4)
    curve = masking_curve(PixelZero(), data, percentages=[0, 25, 50, 75, 100], order="least_salient", fill="zero")
    assert curve.accuracy == [100.0, 100.0, 100.0, 100.0, 0.0]  # pixel 0 goes last


def test_masking_curve__random_order_and_gap():
    model, data = small_cnn(), loader(n=20)
    by_saliency = masking_curve(model, data, percentages=range(0, 101, 10))
    by_random = masking_curve(model, data, percentages=range(0, 101, 10), order="random")
    assert by_random.accuracy[0] == by_saliency.accuracy[0]
    assert faithfulness_gap(by_saliency.auc, by_random.auc) == pytest.approx(
        (by_random.auc - by_saliency.auc) / by_random.auc
    )


def test_deletion_insertion__batched_equals_naive():
    model, data = small_cnn(), loader(n=6)
    result = deletion_insertion(model, data, steps=4, max_batch_size=8)
    images, _ = next(iter(DataLoader(data.dataset, batch_size=6)))
    predictions = model(images).argmax(-1)
    maps = saliency_maps(model, images, predictions)
    blurred = __import__("sd_plugin.core.masking", fromlist=["fill_values"]).fill_values(images, "blur")
    deletion, insertion = [], []
    for fraction in result.fractions:
        d_total = i_total = 0.0
        for k in range(6):
            order = maps[k].flatten().argsort(descending=True, stable=True)[: int(round(fraction * 36))]
            deleted = images[k].clone().view(3, -1)
            inserted = blurred[k].clone().reshape(3, -1)
            deleted[:, order] = 0.0
            inserted[:, order] = images[k].view(3, -1)[:, order]
            d_total += model(deleted.view(1, 3, 6, 6)).softmax(-1)[0, predictions[k]].item()
            i_total += model(inserted.view(1, 3, 6, 6)).softmax(-1)[0, predictions[k]].item()
        deletion.append(d_total / 6)
        insertion.append(i_total / 6)
    assert result.deletion == pytest.approx(deletion, abs=1e-6)
    assert result.insertion == pytest.approx(insertion, abs=1e-6)
    assert result.deletion_auc == pytest.approx(rise_auc(deletion), abs=1e-6)


def test_sparseness__one_hot_and_constant():
    one_hot = torch.zeros(2, 8, 8)
    one_hot[0, 3, 4] = 5.0
    one_hot[1, 0, 0] = -0.1
    assert sparseness(one_hot).tolist() == [1.0, 1.0]
    assert sparseness(torch.full((3, 8, 8), 2.0)).tolist() == [0.0, 0.0, 0.0]
    assert sparseness(torch.zeros(1, 4, 4)).tolist() == [0.0]
    mixed = sparseness(torch.rand(4, 8, 8))
    assert ((mixed > 0) & (mixed < 1)).all()


def test_effective_rank__white_and_rank_one():
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    white = q[:, :16] - q[:, :16].mean(0)  # orthogonal, centred columns: covariance is c * I
    white, _ = torch.linalg.qr(white)
    assert float(effective_rank(white - white.mean(0))) == pytest.approx(16.0, rel=1e-2)
    q2, _ = torch.linalg.qr(torch.cat([torch.ones(64, 1), torch.randn(64, 16)], 1).double())
    orthogonal = q2[:, 1:]  # orthonormal and orthogonal to the ones vector: zero-mean columns
    assert float(effective_rank(orthogonal)) == pytest.approx(16.0, abs=1e-9)
    rank_one = torch.randn(100, 1) @ torch.randn(1, 12)
    assert float(effective_rank(rank_one)) == pytest.approx(1.0, abs=1e-6)


def test_randomization__one_at_zero_layers_then_decorrelates():
    model = small_cnn(dtype=torch.float32)
    images, labels = next(iter(loader(n=8, dtype=torch.float32, batch_size=8)))
    check = parameter_randomization(model, images, labels, points=None)
    assert check.layers[0] == "(none)"
    assert check.correlations[0] == pytest.approx(1.0)
    assert check.correlations[-1] < 0.5
    assert len(check.correlations) == 4  # 3 layers with parameters + none
    a = torch.rand(3, 50)
    assert torch.allclose(spearman(a, 2 * a + 1), torch.ones(3, dtype=torch.float64))


def test_attribution__integrated_gradients_is_exact_on_a_linear_model():
    pytest.importorskip("captum")
    torch.manual_seed(0)
    linear = nn.Linear(2 * 3 * 3, 4).double()
    model = nn.Sequential(nn.Flatten(), linear)
    nn.init.zeros_(linear.bias)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    ig = saliency_maps(model, x, y, "integrated_gradients", ig_steps=8)
    expected = (x * linear.weight[y].view(5, 2, 3, 3)).abs().mean(1)  # completeness for a linear map
    torch.testing.assert_close(ig, expected)
    smooth = saliency_maps(model, x, y, "smoothgrad", smoothgrad_samples=4)
    torch.testing.assert_close(smooth, linear.weight[y].view(5, 2, 3, 3).abs().mean(1))  # constant gradient


def test_bad_input__clear_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match="floating point"):
        masking_curve(model, [(torch.zeros(2, 3, 6, 6, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="no images"):
        masking_curve(model, [])
    with pytest.raises(ValueError, match=r"percentages must lie in \[0, 100\]"):
        masking_curve(model, loader(), percentages=[0, 50, 120])
    with pytest.raises(ValueError, match="no labels"):
        masking_curve(model, [{"pixel_values": torch.zeros(2, 3, 6, 6)}])
    with pytest.raises(ValueError, match="order='best'"):
        masking_curve(model, loader(), order="best")


def _save_digits_model(path, seed):
    from sd_plugin.cli.demo import build_demo_model

    model = build_demo_model(seed)
    model.save_pretrained(path)
    return path


def test_cli__two_saved_models_write_table_json_and_figures(tmp_path, capsys):
    from sd_plugin.__main__ import main as cli

    first = _save_digits_model(tmp_path / "a" / "model", 0)
    second = _save_digits_model(tmp_path / "b" / "model", 1)
    out = tmp_path / "eval"
    code = cli(
        [
            "evaluate",
            "--model",
            str(first),
            "--compare",
            str(second),
            "--dataset",
            "digits",
            "--output-dir",
            str(out),
            "--max-images",
            "40",
            "--step",
            "20",
            "--randomization",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| a/model |" in printed and "| b/model |" in printed
    assert "RISE deletion" in printed and "pointing game" not in printed  # no localization columns, no legend
    from sd_plugin.cli.evaluate import build_parser

    usage = build_parser().format_help()
    assert "localization dataset" in usage and "relevance mass" in usage and "per_image" in usage
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"a/model", "b/model"}
    assert results["split"] == "test"  # the split loaded, not the flag's None
    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    for key in results:  # the evaluation page documents the file
        assert f"`{key}`" in docs, key
    for metrics in results["models"].values():
        # every key is described in the file itself: a metric (with its direction) or a field
        assert set(metrics) <= set(results["metrics"]) | set(results["fields"]), set(metrics) - set(results["metrics"])
        assert metrics["num_images"] == 40
        assert 0 <= metrics["masking_auc"] <= 10000
        assert metrics["curves"]["saliency"]["percentages"] == [0, 20, 40, 60, 80, 100]
        assert metrics["randomization"]["correlations"][0] == pytest.approx(1.0)
    for name in ("saliency.png", "masking_curves.png", "gradient_boxplot.png"):
        assert (out / name).stat().st_size > 5_000


def test_cli__timm_model_on_image_folder(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import sd_plugin.evaluation.figures as figures

    captions = []
    original = figures.saliency_grid

    def recording_grid(images, maps, path, labels=None, **kwargs):
        captions.extend(labels or [])
        return original(images, maps, path, labels=labels, **kwargs)

    monkeypatch.setattr(figures, "saliency_grid", recording_grid)

    from sd_plugin.__main__ import main as cli

    folder = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for label in ("cat", "dog", "fox"):
        (folder / label).mkdir(parents=True)
        for i in range(6):  # class-sorted: the first 6 images are all cats
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    model = tiny_models.build("timm_vit", tmp_path)
    code = cli(
        [
            "evaluate",
            "--model",
            str(tmp_path / "timm_vit"),
            "--dataset",
            str(folder),
            "--output-dir",
            str(tmp_path / "out"),
            "--step",
            "25",
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (metrics,) = results["models"].values()
    assert metrics["num_images"] == 18 and metrics["num_features"] == 32
    # the figure's 6 images come from the seeded subset of this class-sorted folder, labelled
    assert len(captions) == 6 and len(set(captions)) > 1
    del model


def test_trainer__reports_masking_auc_at_evaluation(tmp_path):
    from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
    from sd_plugin.storage.tensor_datasets import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 3, (24,), generator=g))
    args = SaliencyDecorConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=16,
        group_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        eval_masking_auc=True,
        eval_masking_samples=16,
        eval_masking_step=25,
        disable_tqdm=True,
    )
    trainer = SaliencyDecorTrainer(
        model=tiny_models.build("timm_resnet", tmp_path), args=args, train_dataset=data, eval_dataset=data
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_masking_auc"] <= 10000
    assert 0 <= metrics["eval_masking_auc_random"] <= 10000
    assert "eval_faithfulness_gap" in metrics and 0 <= metrics["eval_accuracy"] <= 1
    assert any("eval_masking_auc" in entry for entry in trainer.state.log_history)


def test_accuracy__equals_the_masking_curve_at_zero():
    from sd_plugin.evaluation.report import accuracy

    model, data = small_cnn(), loader(n=20)
    assert accuracy(model, data) == masking_curve(model, data, percentages=[0, 100]).accuracy[0]


class Recording(nn.Module):
    """Class = image brightness (0 or 1); remembers the brightness of every clean image it saw."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.seen = []

    def forward(self, x):
        brightness = x.mean((1, 2, 3))
        self.seen.append(brightness.detach())
        return torch.stack([(0.5 - brightness) * self.scale, (brightness - 0.5) * self.scale], dim=1)


def test_masking_test_metrics__random_subset_spread_over_a_class_sorted_set():
    """Issue 11, item 3: the first N images of a class-sorted folder are all of one class."""
    from sd_plugin.evaluation.masking_curve import masking_test_metrics

    images = torch.cat([torch.zeros(50, 1, 4, 4), torch.ones(50, 1, 4, 4)])
    labels = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    model = Recording()
    masking_test_metrics(model, DataLoader(TensorDataset(images, labels), batch_size=8), max_images=10)
    brightness = torch.cat(model.seen)
    assert (brightness == 0).any() and (brightness == 1).any()
    model.seen.clear()
    masking_test_metrics(model, DataLoader(TensorDataset(images, labels), batch_size=8), max_images=10)
    assert torch.equal(torch.cat(model.seen), brightness)  # the same images every time


def image_folder(root, classes, per_class=2, size=16):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_evaluation_data__label_sets_that_do_not_match_the_model_are_refused(tmp_path):
    """Issue 11, item 9: a 2-class folder scored by a 3-class model used to report 0.00% silently."""
    from sd_plugin.storage.eval_datasets import load_eval_dataset

    model = tiny_models.build("hf_resnet", tmp_path)  # 3 outputs, generic LABEL_i names
    fits = load_eval_dataset(str(image_folder(tmp_path / "three", ["a", "b", "c"])), None, model)
    assert len(fits) == 6
    with pytest.raises(ValueError, match="has 2 classes but the model has 3 outputs"):
        load_eval_dataset(str(image_folder(tmp_path / "two", ["a", "b"])), None, model)
    model.config.id2label = {0: "cat", 1: "dog", 2: "fox"}
    with pytest.raises(ValueError, match=r"has the classes \['a', 'b', 'c'\] but the model was trained for"):
        load_eval_dataset(str(tmp_path / "three"), None, model)
    with pytest.raises(ValueError, match="has 10 classes but the model has 3 outputs"):
        load_eval_dataset("digits", None, model)


def test_evaluation_data__grey_digits_fit_an_rgb_model(tmp_path):
    from sd_plugin.evaluation.report import evaluate_model
    from sd_plugin.storage.eval_datasets import load_eval_dataset

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model.append(torch.nn.Linear(4, 10))
    data = load_eval_dataset("digits", None, model)
    example = data[0]["pixel_values"]
    assert example.shape[0] == 3 and torch.equal(example[0], example[2])
    metrics = evaluate_model(model, torch.utils.data.Subset(data, range(8)), feature_layer="2", batch_size=4)
    assert metrics["num_images"] == 8


def test_readme__saliency_maps_from_python_runs(tmp_path, monkeypatch):
    """docs/evaluation.md's snippet for looking at saliency maps runs as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    block = readme.split("<!-- saliency-python -->")[1].split("<!-- /saliency-python -->")[0]
    code = block.split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/evaluation.md", "exec"), {})
    assert (tmp_path / "saliency.png").stat().st_size > 0


def test_masking_curves__one_pass_equals_each_order_alone():
    """MoRF and LeRF share one saliency pass per batch and give the curves of separate calls."""
    from sd_plugin.evaluation.masking_curve import masking_curves

    model, data = small_cnn(), loader(n=20)
    percentages = [0, 20, 50, 80, 100]
    together = masking_curves(model, data, ("saliency", "least_salient", "random"), percentages, fill="random")
    for order, curve in together.items():
        alone = masking_curve(model, data, percentages=percentages, order=order, fill="random")
        assert curve.accuracy == alone.accuracy, order


@pytest.mark.parametrize("attribution", ["gradient", "logit_gradient"])
def test_evaluate_model__maps_computed_once_give_the_same_results_as_per_metric(attribution, monkeypatch):
    """Issue 29, item 3: one saliency pass per target feeds every metric, and nothing it reports changes."""
    from sd_plugin.evaluation import report
    from sd_plugin.storage.cluttered_digits import cluttered_digits_splits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 20 * 20, 10))
    _, test = cluttered_digits_splits()
    kwargs = dict(batch_size=16, percentages=(0.0, 25.0, 50.0, 100.0), deletion_steps=4, max_images=40)
    kwargs.update(sparseness_images=24, feature_layer="2", attribution=attribution)
    per_metric = report.evaluate_model(model, test, reuse_maps=False, **kwargs)
    passes = []
    monkeypatch.setattr(report, "precompute_maps", _counting(report.precompute_maps, passes))
    once = report.evaluate_model(model, test, **kwargs)
    assert len(passes) == 2  # the maps of the labels, and of the predictions (RISE's target)
    assert once["attribution"] == per_metric["attribution"] == attribution
    assert "relevance_mass" in once  # the localization metrics read the same maps
    for key, value in per_metric.items():
        if isinstance(value, float):
            assert once[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for key, values in per_metric["per_image"].items():
        assert once["per_image"][key] == pytest.approx(values, rel=1e-6, abs=1e-9, nan_ok=True), key


def _counting(function, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapped


def test_evaluate_model__max_images_scores_the_class_spread_subset_the_cli_scores():
    """``evaluate_model(max_images=N)`` from Python scores the images ``evaluate --max-images N`` scores."""
    from sd_plugin.evaluation import evaluate_model  # the package's evaluation namespace exports it
    from sd_plugin.evaluation.attribution import PrecomputedMaps
    from sd_plugin.evaluation.masking_curve import random_subset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(30, 1, 4, 4), torch.arange(30) // 10)  # class-sorted, as image folders are
    kwargs = dict(batch_size=8, percentages=(0.0, 50.0, 100.0), deletion_steps=2, road=False, feature_layer="0")
    python = evaluate_model(model, data, max_images=6, **kwargs)
    subset = random_subset(data, 6)  # what the CLI scores
    assert len({int(data[i][1]) for i in subset.indices}) > 1  # not the first 6 images (one class)
    cli = evaluate_model(model, subset, **kwargs)
    assert python["per_image"]["masking_auc"] == pytest.approx(cli["per_image"]["masking_auc"])
    assert python["accuracy"] == pytest.approx(cli["accuracy"])
    # maps precomputed for the whole dataset are cut to the same subset
    maps = torch.rand(30, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = evaluate_model(model, data, max_images=6, attribution=PrecomputedMaps(maps), **kwargs)
    part = evaluate_model(model, subset, attribution=PrecomputedMaps(maps[subset.indices]), **kwargs)
    assert whole["per_image"]["masking_auc"] == pytest.approx(part["per_image"]["masking_auc"])


@pytest.mark.parametrize("family", ["hf_vit", "timm_resnet"])
def test_attribution_function__gets_what_captum_takes_for_every_family(family, tmp_path):
    """A Captum method passed as ``attribution=`` works on a transformers model as on a timm one."""
    attr = pytest.importorskip("captum.attr")
    from sd_plugin.core.masking import pixel_saliency

    model = tiny_models.build(family, tmp_path).eval()
    images = torch.randn(
        3, 3, tiny_models.IMAGE_SIZE, tiny_models.IMAGE_SIZE, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.tensor([0, 1, 2])

    def occlusion(forward, x, y):
        return attr.Occlusion(forward).attribute(x, target=y, sliding_window_shapes=(3, 4, 4), strides=4)

    maps = saliency_maps(model, images, labels, attribution=occlusion)

    def logits(x):
        output = model(pixel_values=x) if family.startswith("hf") else model(x)
        return output.logits if family.startswith("hf") else output

    expected = pixel_saliency(occlusion(logits, images, labels))
    assert torch.allclose(maps, expected, atol=1e-6)
    assert maps.abs().sum() > 0


def test_figures__say_which_explanation_what_important_means_and_the_auc_unit(tmp_path, monkeypatch):
    """Titles come from the explanation used; the box plot defines "important"; the AUC has its unit."""
    pytest.importorskip("matplotlib")
    from sd_plugin.evaluation import figures
    from sd_plugin.evaluation.masking_curve import MaskingCurve

    drawn = {}

    def keep_texts(fig, plt, path):
        texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
        for ax in fig.axes:
            texts.append(ax.get_title())
            texts += [label.get_text() for label in ax.get_xticklabels()]
            if ax.get_legend() is not None:
                legend = ax.get_legend()
                texts += [legend.get_title().get_text(), *(text.get_text() for text in legend.get_texts())]
        drawn[Path(path).name] = " | ".join(texts)
        plt.close(fig)
        return Path(path)

    from pathlib import Path

    monkeypatch.setattr(figures, "_save", keep_texts)
    maps = {"model": torch.rand(2, 4, 4)}
    curve = MaskingCurve(percentages=[0.0, 100.0], accuracy=[100.0, 0.0], order="saliency", fill="mean", num_images=2)
    figures.saliency_grid(torch.rand(2, 3, 4, 4), maps, tmp_path / "saliency.png", explanation="integrated_gradients")
    figures.masking_curves_figure({"model": [curve]}, tmp_path / "curves.png", explanation="integrated_gradients")
    figures.gradient_boxplot(maps, tmp_path / "box.png", explanation="integrated_gradients")
    assert "Integrated Gradients" in drawn["saliency.png"] and "dL/dx" not in drawn["saliency.png"]
    assert "Integrated Gradients" in drawn["curves.png"] and "AUC 5000 %·%" in drawn["curves.png"]
    assert "max 10000" in drawn["curves.png"]
    assert "top 25% pixels by its own map" in drawn["box.png"] and "Integrated Gradients" in drawn["box.png"]


def test_progress__removal_curves_and_deletion_advance_within_a_single_batch(monkeypatch):
    """With one batch, the bars still advance per curve / per deletion level, up to their totals."""
    import tqdm.auto

    from sd_plugin.evaluation.masking_curve import faithfulness_curves

    bars = []

    class Recorder:
        def __init__(self, iterable=None, total=None, **kwargs):
            self.iterable, self.total, self.count, self.desc = iterable, total, 0, kwargs.get("desc")
            bars.append(self)

        def __iter__(self):
            for item in self.iterable:
                self.count += 1
                yield item

        def update(self, count=1):
            self.count += count

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    data = DataLoader(TensorDataset(torch.randn(6, 1, 4, 4), torch.tensor([0, 1] * 3)), batch_size=64)
    curves = faithfulness_curves(model, data, percentages=[0, 50, 100], blur_sigma=1.0, progress=True)
    assert bars[-1].total == bars[-1].count == len(curves) > 1
    deletion_insertion(model, data, steps=4, progress=True)
    assert bars[-1].total == bars[-1].count == 5
