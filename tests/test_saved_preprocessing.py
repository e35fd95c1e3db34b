"""Every folder the package writes records how to preprocess for it: trained size, processor, class names."""

import json
import warnings

import pytest
import tiny_models
from PIL import Image

from sd_plugin.hub import export
from sd_plugin.storage.eval_datasets import check_labels_fit
from sd_plugin.storage.loading import load_classifier, load_for_finetuning
from sd_plugin.storage.model_preprocessing import image_transform

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


def test_export_cli__preprocessing_from_flag_supplies_the_processor(tmp_path, capsys):
    """The warning's advice works on the command line: ``--preprocessing-from`` is a flag of ``export``."""
    from sd_plugin.cli.hub import export_main

    model = tiny_models.build("hf_resnet", tmp_path)
    (tmp_path / "hf_resnet" / "preprocessor_config.json").rename(tmp_path / "kept.json")
    train_and_save(model, tmp_path)
    with pytest.warns(UserWarning, match="--preprocessing-from <folder>"):
        assert export_main([str(tmp_path / "run"), str(tmp_path / "bare")]) == 0
    assert export_main([str(tmp_path / "run"), str(tmp_path / "x"), "--preprocessing-from", str(tmp_path)]) == 2
    assert "has no preprocessor_config.json" in capsys.readouterr().err
    processor_folder = tmp_path / "processor"
    processor_folder.mkdir()
    (tmp_path / "kept.json").rename(processor_folder / "preprocessor_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        flags = [str(tmp_path / "run"), str(tmp_path / "exported"), "--preprocessing-from", str(processor_folder)]
        assert export_main(flags) == 0
    assert (tmp_path / "exported" / "preprocessor_config.json").is_file()


def _grey_vit_folder(tmp_path):
    """A saved 32 px, one-channel, ten-class transformers ViT (the built-in sets' shape)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_channels=1, num_labels=10,
    )  # fmt: skip
    folder = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def test_evaluate_builtin_digits__at_the_size_the_model_takes(tmp_path):
    """``--dataset digits`` is built at the folder's recorded size (or the config's), not a fixed 16 px."""
    import torch

    from sd_plugin.__main__ import main as cli
    from sd_plugin.storage.checkpoint import write_metadata
    from sd_plugin.storage.eval_datasets import load_eval_dataset

    folder = _grey_vit_folder(tmp_path)
    model = load_classifier(folder)
    assert load_eval_dataset("digits", None, model, folder)[0]["pixel_values"].shape == (1, 32, 32)
    flags = ["--dataset", "digits", "--max-images", "8", "--step", "50", "--no-road", "--no-progress"]
    assert cli(["evaluate", "--model", str(folder), "--output-dir", str(tmp_path / "eval"), *flags]) == 0

    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    cnn.append(torch.nn.Linear(4, 10))
    (tmp_path / "cnn").mkdir()
    write_metadata(tmp_path / "cnn", {"input_size": [1, 24, 24]})  # the size it was trained at
    assert load_eval_dataset("digits", None, cnn, tmp_path / "cnn")[0]["pixel_values"].shape == (1, 24, 24)
    assert load_eval_dataset("digits", None, cnn)[0]["pixel_values"].shape == (1, 16, 16)  # nothing recorded


def test_evaluate_builtin_cluttered_digits__the_demos_ground_truth_adds_localization(tmp_path):
    """``--dataset cluttered-digits``: the demo's data with masks, at the model's size; localization metrics appear."""
    import json

    from sd_plugin.__main__ import main as cli
    from sd_plugin.cli.demo import build_demo_model
    from sd_plugin.storage.checkpoint import write_metadata
    from sd_plugin.storage.eval_datasets import load_eval_dataset

    folder = tmp_path / "demo-model"
    build_demo_model(0).save_pretrained(folder)
    model = load_classifier(folder)
    item = load_eval_dataset("cluttered-digits", None, model, folder)[0]
    assert item["pixel_values"].shape == (1, 20, 20) and item["masks"].shape == (20, 20)  # the demo's canvas
    write_metadata(folder, {"input_size": [1, 30, 30]})
    item = load_eval_dataset("cluttered-digits", None, model, folder)[0]
    assert item["pixel_values"].shape == (1, 30, 30) and int(item["masks"].sum()) == 18 * 18
    flags = ["--dataset", "cluttered-digits", "--max-images", "8", "--step", "50", "--no-road", "--no-progress"]
    assert cli(["evaluate", "--model", str(folder), "--output-dir", str(tmp_path / "eval"), *flags]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    (scores,) = results["models"].values()
    assert 0.0 <= scores["relevance_mass"] <= 1.0 and len(scores["per_image"]["pointing_game"]) == 8


@pytest.mark.fashion_mnist
def test_evaluate_builtin_fashion_mnist__at_the_size_the_model_takes(tmp_path):
    """``--dataset fashion-mnist`` is built at the folder's recorded size, as ``digits`` is."""
    from sd_plugin.storage.eval_datasets import load_eval_dataset

    folder = _grey_vit_folder(tmp_path)
    model = load_classifier(folder)
    assert load_eval_dataset("fashion-mnist", None, model, folder)[0]["pixel_values"].shape == (1, 32, 32)


@pytest.mark.parametrize("family", ["timm_resnet", "hf_vit"])
def test_training_normalisation__recorded_for_evaluate_export_and_reloads(family, tmp_path):
    """A transform normalising with its own mean / std (set as image_mean / image_std) is what every reader uses."""
    import datasets
    import torch
    from torchvision.transforms.v2 import functional

    from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
    from sd_plugin.storage.checkpoint import read_metadata

    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]

    def train_transform(image):
        pixels = functional.pil_to_tensor(image.convert("RGB")).float() / 255
        return functional.normalize(pixels, mean, std)

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(16)]
    raw = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(16)]})
    train = raw.with_transform(lambda batch: {**batch, "pixel_values": [train_transform(i) for i in batch["image"]]})
    args = SaliencyDecorConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=16, group_size=8, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, image_mean=mean, image_std=std,
    )  # fmt: skip
    trainer = SaliencyDecorTrainer(model=tiny_models.build(family, tmp_path), args=args, train_dataset=train)
    trainer.train()
    trainer.save_model()
    folder = tmp_path / "run"
    assert read_metadata(folder)["preprocessing"]["mean"] == mean
    # evaluate (and load_classifier) preprocess a test image exactly as training did
    expected = train_transform(images[0])
    evaluate_transform = image_transform(load_classifier(folder), folder)
    assert torch.allclose(evaluate_transform(images[0]), expected, atol=1e-5)
    # the exported folder: what its card's code reads
    exported = export(folder, tmp_path / "exported")
    if family == "timm_resnet":
        import timm

        config = json.loads((exported / "config.json").read_text())["pretrained_cfg"]
        assert config["mean"] == mean and config["std"] == std and config["crop_pct"] == 1.0
        reloaded = timm.create_model(f"local-dir:{exported}", pretrained=True)
        card_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=reloaded))  # the card's
        assert torch.allclose(card_transform(images[0]), expected, atol=1e-5)
    else:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(exported)
        assert torch.allclose(processor(images[0], return_tensors="pt")["pixel_values"][0], expected, atol=1e-5)


def test_training_normalisation__unknown_for_a_raw_image_dataset_is_warned_of(tmp_path):
    import datasets
    import torch

    from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer, SaliencyDecorWarning

    raw = datasets.Dataset.from_dict({"image": [Image.new("RGB", (16, 16))] * 16, "label": [i % 3 for i in range(16)]})
    train = raw.with_transform(lambda batch: {**batch, "pixel_values": [torch.zeros(3, 16, 16)] * len(batch["image"])})
    args = SaliencyDecorConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=16, group_size=8, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = SaliencyDecorTrainer(model=tiny_models.build("timm_resnet", tmp_path), args=args, train_dataset=train)
    with pytest.warns(SaliencyDecorWarning, match="Set SaliencyDecorConfig\\(image_mean=..., image_std=..."):
        trainer.train()
    with pytest.raises(ValueError, match="image_mean and image_std go together"):
        SaliencyDecorTrainer(
            model=tiny_models.build("timm_resnet", tmp_path / "b"),
            args=SaliencyDecorConfig(output_dir=str(tmp_path / "c"), image_mean=[0.5] * 3, report_to="none"),
            train_dataset=train,
        )
