"""Every folder the package writes records how to preprocess for it: trained size, processor, class names."""

import json
import warnings

import pytest
import tiny_models
from PIL import Image

from sd_plugin.hub import export
from sd_plugin.storage.data import check_labels_fit, image_transform
from sd_plugin.storage.loading import load_classifier, load_for_finetuning

IMAGE = Image.new("RGB", (40, 30), (120, 60, 30))


def train_and_save(model, tmp_path):
    return tiny_models.train_and_save(model, tmp_path / "run")


def test_timm_folder__records_the_trained_size_and_evaluate_preprocesses_at_it(tmp_path):
    # resnet10t's own data config says 176/224 px; the model was trained on 16 px batches
    tiny_models.build("timm_resnet", tmp_path)
    model = load_for_finetuning(f"local-dir:{tmp_path / 'timm_resnet'}", 3, ["cat", "dog", "emu"])
    trainer = train_and_save(model, tmp_path)
    folder = tmp_path / "run"
    assert json.loads((folder / "saliency_decor.json").read_text())["input_size"] == [3, 16, 16]
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16] and config["label_names"] == ["cat", "dog", "emu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is guessed
        assert image_transform(load_classifier(folder), folder)(IMAGE).shape == (3, 16, 16)
    exported = export(trainer, tmp_path / "exported")
    import timm

    plain = timm.create_model(f"local-dir:{exported}", pretrained=True)
    assert timm.data.resolve_data_config(model=plain)["input_size"] == (3, 16, 16)
    # the class names travel: another dataset's classes are refused as for transformers folders
    reloaded = load_classifier(exported)
    check_labels_fit(reloaded, 3, ["cat", "dog", "emu"], "same")
    with pytest.raises(ValueError, match="has the classes"):
        check_labels_fit(reloaded, 3, ["ant", "bee", "cow"], "other")


def test_transformers_folder_without_processor__export_warns_and_evaluate_says_what_it_guessed(tmp_path):
    model = tiny_models.build("hf_resnet", tmp_path)
    (tmp_path / "hf_resnet" / "preprocessor_config.json").unlink()  # a checkpoint without a processor
    trainer = train_and_save(model, tmp_path)
    with pytest.warns(UserWarning, match="no image processor to save"):
        exported = export(trainer, tmp_path / "exported")
    assert not (exported / "preprocessor_config.json").exists()
    card = (exported / "README.md").read_text()
    assert "AutoImageProcessor" not in card and "preprocess images as in training" in card
    with pytest.warns(UserWarning, match="records no preprocessing.*resizing to 16 px"):
        transform = image_transform(load_classifier(exported), exported)
    assert transform(IMAGE).shape == (3, 16, 16)  # the trained size, not the config's 224


def test_transformers_folder__processor_of_the_model_it_started_from_is_saved_and_used_by_the_card(tmp_path):
    from transformers import AutoImageProcessor, ViTImageProcessor

    model = tiny_models.build("hf_resnet", tmp_path)
    ViTImageProcessor(size={"height": 24, "width": 24}).save_pretrained(tmp_path / "hf_resnet")
    trainer = train_and_save(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        exported = export(trainer, tmp_path / "exported")
    processor = AutoImageProcessor.from_pretrained(exported)
    assert processor.size == {"height": 16, "width": 16}  # set to the size it was trained at
    assert "processor = AutoImageProcessor.from_pretrained" in (exported / "README.md").read_text()
