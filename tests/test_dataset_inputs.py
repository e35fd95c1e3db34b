"""What users feed the package: datasets as transformers' guides build them, and the mistakes in them."""

import json
from pathlib import Path

import pytest
import tiny_models
import torch
from PIL import Image

from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer, SaliencyDecorWarning
from sd_plugin.storage.image_datasets import HFImageDataset, UnreadableImageError, folder_classes, image_folder_dataset

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=8,
        group_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return SaliencyDecorConfig(**{**values, **overrides})


def image_folder(root, classes=("ant", "bee", "cow"), per_class=3):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), (80 * k, 30 * i, 10)).save(root / name / f"{i}.jpg")
    return root


def test_with_transform_dataset__trains_without_remove_unused_columns_false(tmp_path):
    # transformers' image-classification guide: an `image` column turned into pixel_values on the fly
    import datasets

    images = [Image.new("RGB", (16, 16), (20 * i, 0, 0)) for i in range(8)]
    raw = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(8)]})
    from torchvision.transforms.v2.functional import pil_to_tensor

    def transform(batch):
        batch["pixel_values"] = [pil_to_tensor(image.convert("RGB")).float() / 255 for image in batch["image"]]
        return batch

    train = raw.with_transform(transform)
    args = config(tmp_path, image_mean=[0.0] * 3, image_std=[1.0] * 3)  # the transform's (no) normalisation
    assert args.remove_unused_columns  # the TrainingArguments default
    trainer = SaliencyDecorTrainer(model=tiny_models.build("hf_resnet", tmp_path), args=args, train_dataset=train)
    assert trainer.train().global_step == 1


def test_unreadable_images__named_or_skipped_with_one_warning(tmp_path):
    root = image_folder(tmp_path / "train")
    good = (root / "ant" / "0.jpg").read_bytes()
    (root / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cow" / "empty.jpg").write_bytes(b"")
    dataset = image_folder_dataset(root, folder_classes(root), lambda image: torch.zeros(3, 4, 4))
    by_name = {path.name: i for i, (path, _) in enumerate(dataset.samples)}
    for name in ("truncated.jpg", "empty.jpg"):
        with pytest.raises(UnreadableImageError, match=f"{name}.*--skip_unreadable_images"):
            dataset[by_name[name]]
    with pytest.warns(SaliencyDecorWarning, match="skipped 2 of 11 images"):
        kept = dataset.without_unreadable()
    assert len(kept) == 9 and all(kept[i]["pixel_values"].shape == (3, 4, 4) for i in range(9))


def test_evaluate__names_an_unreadable_file_leaves_no_folder_and_can_skip_it(tmp_path):
    model_dir = tmp_path / "model"
    tiny_models.build("hf_resnet", tmp_path).save_pretrained(model_dir)
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    data = image_folder(tmp_path / "images", classes=("LABEL_0", "LABEL_1", "LABEL_2"))
    (data / "LABEL_1" / "empty.jpg").write_bytes(b"")
    output = tmp_path / "evaluation"
    from sd_plugin.__main__ import main as cli

    command = ["evaluate", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(output)]
    command += ["--step", "50", "--no-progress", "--no-road", "--blur-sigma", "0"]
    with pytest.raises(UnreadableImageError, match="empty.jpg.*--skip-unreadable-images"):
        cli(command)
    assert not output.exists()  # no empty output folder left behind
    with pytest.warns(SaliencyDecorWarning, match="skipped 1 of 10 images"):
        assert cli([*command, "--skip-unreadable-images"]) == 0
    assert json.loads((output / "results.json").read_text())["models"]


def test_dataset_shape_mistakes__each_refused_with_what_is_wrong(tmp_path):
    root = image_folder(tmp_path / "empty_class")
    (root / "emu").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\] hold no images"):
        folder_classes(root)
    with pytest.raises(ValueError, match="holds one class .*at least 2"):
        folder_classes(image_folder(tmp_path / "one", classes=("ant",)))
    train = image_folder(tmp_path / "train", classes=("ant", "bee"))
    test = image_folder(tmp_path / "test", classes=("ant", "bee", "emu"))
    with pytest.raises(ValueError, match="emu is not one of the 2 training classes \\(ant, bee\\)"):
        image_folder_dataset(test, folder_classes(train), lambda image: image)
    import datasets

    unlabelled = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 3, "label": [0, -1, -1]})
    with pytest.raises(ValueError, match="holds -1 for 2 of 3 examples.*labelled split"):
        HFImageDataset(unlabelled, lambda image: image)


def test_settings_that_would_silently_do_nothing__refused(tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size=1.*never be applied"):
        config(tmp_path, per_device_train_batch_size=1)
    config(tmp_path, per_device_train_batch_size=1, method="sgt")  # no decorrelation term: fine

    class OneOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)), torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(self.body(x))

    model = OneOutput()
    data = [{"pixel_values": torch.randn(3, 8, 8), "labels": 0} for _ in range(8)]
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path, method="sgt"), train_dataset=data)
    with pytest.raises(ValueError, match="head has 1 output: a classifier needs at least 2 classes"):
        trainer.train()


def _imagefolder_trainer(tmp_path, root, model, **overrides):
    """transformers' guide: ``load_dataset("imagefolder")`` transformed on the fly, into the Trainer."""
    import datasets
    from torchvision.transforms.v2.functional import pil_to_tensor

    raw = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")

    def transform(batch):
        batch["pixel_values"] = [
            pil_to_tensor(image.convert("RGB").resize((16, 16))).float() / 255 for image in batch["image"]
        ]
        return batch

    train = raw.with_transform(transform)
    overrides = {"image_mean": [0.0] * 3, "image_std": [1.0] * 3, **overrides}  # the transform's normalisation
    return SaliencyDecorTrainer(model=model, args=config(tmp_path, **overrides), train_dataset=train)


def test_trainer__unreadable_image_named_before_the_first_step(tmp_path):
    root = image_folder(tmp_path / "train", per_class=4)
    good = (root / "ant" / "0.jpg").read_bytes()
    (root / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    trainer = _imagefolder_trainer(tmp_path, root, tiny_models.build("hf_resnet", tmp_path))
    with pytest.raises(UnreadableImageError, match=r"train_dataset: 1 of 13 images do not decode: .*truncated\.jpg"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before any step
    # the check can be turned off (a very large set): then the file fails later, as before
    quiet = _imagefolder_trainer(tmp_path, root, tiny_models.build("hf_resnet", tmp_path), check_datasets=False)
    with pytest.raises(OSError) as later:  # PIL's own error, from the data loader
        quiet.train()
    assert "train_dataset:" not in str(later.value)


def test_trainer__empty_class_folder_and_labels_past_the_model_found_before_the_first_step(tmp_path):
    root = image_folder(tmp_path / "train", per_class=4)
    (root / "dog").mkdir()  # an empty class folder: `datasets` drops it, the model has 4 outputs
    from sd_plugin.storage.data_checks import check_training_data

    model = tiny_models.build("timm_resnet", tmp_path)  # 3 outputs
    import datasets

    raw = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    assert raw.features["label"].names == ["ant", "bee", "cow"]
    check_training_data(raw, model, "train_dataset")  # 3 classes, 3 outputs: nothing to say
    four = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 4, "label": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"train_dataset has labels up to 3 but the model has 3 outputs"):
        check_training_data(four, model, "train_dataset")
    # a 4-output model trained on the 3 classes datasets kept: warned, naming the class without examples
    import timm

    wide = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    trainer = _imagefolder_trainer(tmp_path, root, wide)
    with pytest.warns(
        SaliencyDecorWarning, match=r"model class 3 has no example \(its classes: \['ant', 'bee', 'cow'\]\)"
    ):
        trainer.train()
