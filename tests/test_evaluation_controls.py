"""The evaluation controls: ROAD imputation, the blur control, localization, any attribution, per-image scores."""

import json
import sys

import numpy as np
import pytest
import torch
from road_reference import reference_impute_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sd_plugin.evaluation.attribution import PrecomputedMaps, blur_maps, blurred, saliency_maps
from sd_plugin.evaluation.deletion_insertion import deletion_insertion
from sd_plugin.evaluation.imputation import noisy_linear_impute
from sd_plugin.evaluation.localization import pointing_game, relevance_mass, relevance_rank
from sd_plugin.evaluation.masking_curve import (
    faithfulness_curves,
    masking_curve,
    num_masked_pixels,
    percentages_every,
    pixel_ranks,
)
from sd_plugin.evaluation.randomization import parameter_randomization, spearman


def small_cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 64, 4)
    ).to(dtype)  # fmt: skip


def data(n=10, seed=0, dtype=torch.float64, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    return DataLoader(TensorDataset(images, torch.randint(0, 4, (n,), generator=g)), batch_size=batch_size)


# ROAD imputation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_linear_impute__equals_the_reference_solver(fraction, dtype):
    g = torch.Generator().manual_seed(int(fraction * 100))
    images = torch.rand(4, 3, 24, 20, generator=g, dtype=dtype)
    removed = torch.rand(4, 24, 20, generator=g) < fraction
    removed[0, 0, :] = True  # a whole border row
    removed[1, :, -1] = True  # a whole border column
    removed[2, 5:15, 5:15] = True  # one large hole
    removed[3, 10, :] = True  # a row across the image
    ours = noisy_linear_impute(images, removed, noise=0.0)
    reference = reference_impute_batch(images.double(), removed)
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-7)
    assert torch.equal(ours[~removed.unsqueeze(1).expand_as(ours)], images[~removed.unsqueeze(1).expand_as(images)])


def test_noisy_linear_impute__noise_is_seeded_absolute_and_only_on_removed_pixels():
    images = torch.rand(2, 3, 16, 16)
    removed = torch.rand(2, 16, 16) < 0.5
    plain = noisy_linear_impute(images, removed, noise=0.0)
    first = noisy_linear_impute(images, removed, noise=0.01, generator=torch.Generator().manual_seed(3))
    again = noisy_linear_impute(images, removed, noise=0.01, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    difference = (first - plain)[removed.unsqueeze(1).expand_as(first)]
    assert 0.008 < float(difference.std()) < 0.012
    assert torch.equal((first - plain)[~removed.unsqueeze(1).expand_as(first)].abs().max(), torch.tensor(0.0))


def test_noisy_linear_impute__everything_removed_gives_the_channel_mean_and_bad_shapes_are_named():
    images = torch.rand(1, 3, 6, 6)
    filled = noisy_linear_impute(images, torch.ones(1, 6, 6, dtype=torch.bool), noise=0.0)
    torch.testing.assert_close(filled, images.mean((2, 3), keepdim=True).expand_as(images))
    with pytest.raises(ValueError, match="removed must have shape"):
        noisy_linear_impute(images, torch.ones(1, 5, 6, dtype=torch.bool))


def naive_road_curve(model, loader, percentages, least_salient=False):
    """One level and one image at a time, with the reference solver, no noise."""
    accuracy = []
    for p in percentages:
        correct = total = 0
        for images, labels in loader:
            for image, label in zip(images, labels, strict=True):
                saliency = saliency_maps(model, image[None], label[None])
                ranks = pixel_ranks(-saliency if least_salient else saliency)
                removed = (ranks < num_masked_pixels(p / 100, ranks.shape[1])).view(1, *image.shape[1:])
                filled = reference_impute_batch(image[None], removed) if removed.any() else image[None]
                correct += int(model(filled).argmax(-1)[0] == label)
                total += 1
        accuracy.append(100.0 * correct / total)
    return accuracy


def test_masking_curve__road_fill_equals_one_image_at_a_time_with_the_reference(monkeypatch):
    module = sys.modules["sd_plugin.evaluation.masking_curve"]

    monkeypatch.setattr(module, "noisy_linear_impute", lambda x, m, generator: noisy_linear_impute(x, m, noise=0.0))
    model, loader, percentages = small_cnn(), data(), [0, 10, 30, 60, 90, 100]
    for order, least in (("saliency", False), ("least_salient", True)):
        curve = masking_curve(model, loader, percentages, order=order, fill="road", max_batch_size=12)
        assert curve.accuracy == pytest.approx(naive_road_curve(model, loader, percentages, least))


def test_faithfulness_curves__per_image_aucs_average_to_the_curve_and_each_curve_equals_it_alone():
    model, loader = small_cnn(), data()
    percentages = [0, 25, 50, 75, 100]
    curves = faithfulness_curves(model, loader, percentages=percentages, fills=("mean", "road"), blur_sigma=1.0)
    assert ("blurred", "road", "random") not in curves and ("map", "road", "random") in curves
    for (variant, fill, order), curve in curves.items():
        assert len(curve.per_image_auc) == 10
        assert sum(curve.per_image_auc) / 10 == pytest.approx(curve.auc)
        if variant == "map":
            alone = masking_curve(model, loader, percentages, order=order, fill=fill)
            assert alone.accuracy == curve.accuracy, (fill, order)


# Attributions: blur control, user functions, precomputed maps -------------------------------------


def test_blur_control__blurred_maps_rank_the_pixels_of_the_blurred_saliency():
    model, loader = small_cnn(), data()
    images, labels = next(iter(loader))
    maps = saliency_maps(model, images, labels)
    torch.testing.assert_close(saliency_maps(model, images, labels, blurred("gradient", 1.5)), blur_maps(maps, 1.5))
    constant = torch.full((2, 7, 7), 3.0)
    torch.testing.assert_close(blur_maps(constant, 2.0), constant)
    curves = faithfulness_curves(model, loader, percentages=[0, 50, 100], fills=("mean",), blur_sigma=1.5)
    by_hand = masking_curve(model, loader, [0, 50, 100], attribution=blurred("gradient", 1.5))
    assert curves["blurred", "mean", "saliency"].accuracy == by_hand.accuracy
    with pytest.raises(ValueError, match="sigma"):
        blurred("gradient", 0.0)


def test_attribution__user_function_and_precomputed_maps_score_like_the_builtin():
    model, loader = small_cnn(), data(batch_size=3)

    def loss_gradient(model, images, labels):  # Captum-shaped: (B, C, H, W) signed attributions
        x = images.clone().requires_grad_(True)
        nn.functional.cross_entropy(model(x), labels, reduction="sum").backward()
        return x.grad

    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    maps = saliency_maps(model, images, labels)
    percentages = [0, 20, 50, 100]
    builtin = masking_curve(model, loader, percentages)
    assert masking_curve(model, loader, percentages, attribution=loss_gradient).accuracy == builtin.accuracy
    assert masking_curve(model, loader, percentages, attribution=PrecomputedMaps(maps)).accuracy == builtin.accuracy
    rise = deletion_insertion(model, loader, steps=4, attribution=PrecomputedMaps(maps), target="label")
    assert rise.deletion == deletion_insertion(model, loader, steps=4, target="label").deletion
    with pytest.raises(ValueError, match="precomputed maps"):
        masking_curve(model, loader, percentages, attribution=PrecomputedMaps(maps[:5]))
    with pytest.raises(ValueError, match="not supported"):
        masking_curve(model, loader, percentages, attribution="saliency")


def test_attribution__logit_gradient_is_captum_saliency_and_differs_from_the_loss_gradient():
    captum = pytest.importorskip("captum.attr")
    model, loader = small_cnn(), data()
    images, labels = next(iter(loader))
    expected = captum.Saliency(model).attribute(images.clone(), target=labels).mean(1)
    torch.testing.assert_close(saliency_maps(model, images, labels, "logit_gradient"), expected)
    assert not torch.allclose(saliency_maps(model, images, labels, "gradient"), expected)


def test_smoothgrad__noise_is_scaled_by_each_images_own_range():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :2] * 1.0

    images = torch.zeros(2, 1, 16, 16)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 1.0, 100.0  # value ranges 1 and 100
    saliency_maps(Recorder(), images, torch.zeros(2, dtype=torch.long), "smoothgrad", smoothgrad_samples=8)
    noise = torch.stack(seen) - images
    ratio = float(noise[:, 1].std() / noise[:, 0].std())
    assert 80 < ratio < 120  # each image's noise follows its own range (the batch's would give 1)


# Defects found against Quantus / scipy ------------------------------------------------------------


def test_spearman__ties_and_constant_maps_as_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5, 60), generator=g).double()
    b = torch.randint(0, 6, (5, 60), generator=g).double()
    a[0] = 0.0
    a[0, -6:] = torch.arange(6.0)  # a 90%-zero map
    b[0] = torch.arange(60.0)  # against a ramp
    expected = [stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(5)]
    assert spearman(a, b).tolist() == pytest.approx(expected)
    assert spearman(torch.ones(1, 10), torch.ones(1, 10)).isnan().all()


def test_percentages_every__always_ends_at_100():
    assert percentages_every(3)[-1] == 100.0 and percentages_every(3)[-2] == 99.0
    assert percentages_every(7)[-1] == 100.0 and percentages_every(5) == tuple(float(p) for p in range(0, 101, 5))


def test_evaluation__restores_the_models_modes():
    model, loader = small_cnn(), data()
    model.train()
    model[0].eval()  # a frozen submodule stays frozen
    masking_curve(model, loader, [0, 50, 100])
    deletion_insertion(model, loader, steps=2)
    images, labels = next(iter(loader))
    parameter_randomization(model, images, labels, points=2)
    assert model.training and model[1].training and not model[0].training


# Localization ----------------------------------------------------------------------------------------


def quantus_formulas(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Quantus 0.6.0's RelevanceMassAccuracy / RelevanceRankAccuracy / PointingGame ``evaluate_batch``."""
    a, s = maps.reshape(len(maps), -1), masks.reshape(len(masks), -1).astype(bool)
    a = a / np.abs(a).max(-1, keepdims=True)  # Quantus's default normalise (changes none of the three)
    mass = (a * s).sum(-1) / a.sum(-1)
    s_sums = s.sum(-1)
    ordered = np.argsort(-a, axis=-1)
    s_mask = np.array([[True] * k + [False] * (a.shape[1] - k) for k in s_sums])
    rank = (s[np.arange(len(a))[:, None], ordered] * s_mask).sum(-1) / s_mask.sum(-1)
    pointing = np.any(s * (a == a.max(-1, keepdims=True)), axis=-1).astype(float)
    return {"mass": mass, "rank": rank, "pointing": pointing}


def test_localization_metrics__equal_quantus_formulas_on_the_same_maps():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(16, 12, 12, generator=g) ** 3
    masks = torch.rand(16, 12, 12, generator=g) < torch.linspace(0.05, 0.6, 16).view(16, 1, 1)
    expected = quantus_formulas(maps.numpy(), masks.numpy())
    assert relevance_mass(maps, masks).numpy() == pytest.approx(expected["mass"])
    assert relevance_rank(maps, masks).numpy() == pytest.approx(expected["rank"])
    assert pointing_game(maps, masks).numpy() == pytest.approx(expected["pointing"])
    empty = torch.zeros(1, 12, 12, dtype=torch.bool)
    assert relevance_mass(maps[:1], empty).isnan().all() and pointing_game(maps[:1], empty).isnan().all()


def test_relevance_mass__signed_maps_are_scored_on_their_magnitude_and_stay_within_zero_and_one():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(32, 8, 8, generator=g)  # signed totals near zero made the signed ratio unbounded
    masks = torch.rand(32, 8, 8, generator=g) < 0.3
    expected = quantus_formulas(maps.abs().numpy(), masks.numpy())["mass"]  # Quantus with abs=True
    scores = relevance_mass(maps, masks)
    assert scores.numpy() == pytest.approx(expected) and bool(((scores >= 0) & (scores <= 1)).all())
    signed_ratio = (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)
    assert bool((signed_ratio.abs() > 1).any())  # the old definition left [0, 1] on these maps
    assert relevance_mass(torch.zeros(1, 8, 8), masks[:1]).tolist() == [0.0]  # an all-zero map, not NaN


def test_localization_dataset__masks_follow_the_models_crop_and_an_oracle_map_scores_one(tmp_path):
    from torchvision.transforms import v2

    from sd_plugin.evaluation.report import localization_metrics
    from sd_plugin.storage.localization_data import LocalizationDataset, write_localization_dataset

    root = write_localization_dataset(tmp_path / "loc", objects="digits", counts={"test": 12}, image_size=40)
    manifest = json.loads((root / "localization.json").read_text())
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["seed"] == 0
    crop = v2.Compose([v2.PILToTensor(), v2.Resize(48), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True)])
    plain = LocalizationDataset(root, "test")
    cropped = LocalizationDataset(root, "test", lambda image: crop(image))
    for index in range(len(plain)):
        full = plain[index]["masks"].float()[None, None]
        expected = v2.CenterCrop(32)(nn.functional.interpolate(full, size=(48, 48), mode="bilinear"))[0, 0] > 0.5
        got = cropped[index]["masks"]
        assert float((got != expected).float().mean()) < 0.03  # equal up to interpolation at the edges
        assert 0.02 < float(plain[index]["masks"].float().mean()) < 0.5

    def oracle(model, images, labels):  # the ground truth itself
        return torch.stack([plain[i]["masks"].float() for i in range(len(images))])

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 40 * 40, 10))
    scores = localization_metrics(model, DataLoader(plain, batch_size=12), oracle, blur_sigma=None)
    assert scores["relevance_mass"] == pytest.approx([1.0] * 12) and scores["pointing_game"] == [1.0] * 12
    assert scores["relevance_rank"] == pytest.approx([1.0] * 12)


def test_localization_dataset__photo_objects_are_pasted_whole_with_their_box_as_the_mask(tmp_path):
    from PIL import Image

    from sd_plugin.storage.localization_data import LocalizationDataset, write_localization_dataset

    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for split, count in (("train", 3), ("test", 2)):  # a labelled photo folder: <split>/<class>/ photos
        for name, colour in colours.items():
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (30, 20), colour).save(tmp_path / "photos" / split / name / f"{index}.png")
    (tmp_path / "backgrounds").mkdir()
    Image.new("RGB", (50, 50), (0, 255, 0)).save(tmp_path / "backgrounds" / "green.png")
    root = write_localization_dataset(
        tmp_path / "loc", objects=str(tmp_path / "photos"), backgrounds=tmp_path / "backgrounds",
        counts={"train": 4, "test": 6}, image_size=32,
    )  # fmt: skip
    data = LocalizationDataset(root, "test")
    assert json.loads((root / "localization.json").read_text())["classes"] == ["blue", "red"]
    for index in range(len(data)):
        item = data[index]
        mask, image = item["masks"], item["pixel_values"]
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        box = torch.zeros_like(mask)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(mask, box)  # the mask is a box
        colour = torch.tensor(colours[data.classes[int(item["labels"])]], dtype=torch.float32) / 127.5 - 1
        inside, outside = image[:, mask], image[:, ~mask]  # (3, n), in [-1, 1]: the photo inside, background outside
        assert torch.allclose(inside.mean(1), colour, atol=0.02)
        assert torch.allclose(outside.mean(1), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    with pytest.raises(ValueError, match="no test or validation or val folder"):
        write_localization_dataset(tmp_path / "bad", objects=str(tmp_path / "backgrounds"), counts={"test": 1})


def test_cli__reports_road_blur_and_localization_with_per_image_scores(tmp_path, capsys):
    import tiny_models

    from sd_plugin.__main__ import main as cli
    from sd_plugin.storage.localization_data import write_localization_dataset

    root = write_localization_dataset(tmp_path / "loc", objects="digits", counts={"test": 12}, image_size=32)
    import timm

    overlay = dict(input_size=(3, 32, 32), crop_pct=1.0)  # evaluate at the dataset's 32 px
    model = timm.create_model("resnet10t", num_classes=10, pretrained_cfg_overlay=overlay)
    tiny_models._timm_save_load(model, tmp_path / "resnet", {})
    args = ["evaluate", "--model", str(tmp_path / "resnet"), "--dataset", str(root)]
    code = cli([*args, "--output-dir", str(tmp_path / "out"), "--step", "25", "--no-progress", "--max-images", "10"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ROAD LeRF-MoRF ↑" in printed and "mass ↑" in printed and "blur ROAD L-M ↑" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (metrics,) = results["models"].values()
    for key in ("road_lerf_morf_gap", "blurred_road_lerf_morf_gap", "relevance_mass", "pointing_game"):
        assert key in metrics and results["metrics"][key]["higher_is_better"] is True
    assert results["metrics"]["masking_auc"]["higher_is_better"] is False
    for key in ("road_masking_auc", "relevance_rank", "insertion_auc", "blurred_relevance_mass"):
        assert len(metrics["per_image"][key]) == 10
