import json
import shutil

import pytest
import tiny_models
import torch

from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
from sd_plugin.evaluation import logits_fn
from sd_plugin.storage.builtin_datasets import load_fashion_mnist
from sd_plugin.storage.eval_datasets import load_eval_dataset
from sd_plugin.storage.image_datasets import HFImageDataset
from sd_plugin.storage.loading import load_classifier

needs_fashion_mnist = pytest.mark.fashion_mnist  # skips without the dataset (conftest.py)


@needs_fashion_mnist
def test_fashion_mnist__real_idx_files():
    test = load_fashion_mnist("test")
    assert len(test) == 10_000
    example = test[0]
    assert example["pixel_values"].shape == (1, 28, 28)
    assert example["pixel_values"].min() >= -1 and example["pixel_values"].max() <= 1
    labels = test.labels
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert (labels.bincount() == 1000).all()


@needs_fashion_mnist
def test_fashion_mnist__paper_cnn_learns_with_saliencydecor(tmp_path):
    from torch.utils.data import DataLoader

    from sd_plugin.core.models import PaperCNN
    from sd_plugin.evaluation import masking_curve

    train = load_fashion_mnist("train", limit=3000)
    test = load_fashion_mnist("test", limit=500)
    torch.manual_seed(0)
    model = PaperCNN.mnist()
    args = SaliencyDecorConfig(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        group_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    SaliencyDecorTrainer(model=model, args=args, train_dataset=train).train()
    curve = masking_curve(model, DataLoader(test, batch_size=250), percentages=[0, 50, 100])
    assert curve.accuracy[0] > 50.0  # 10 classes (chance: 10%); one short epoch on 3k images
    assert curve.accuracy[2] < curve.accuracy[0]


def test_fashion_mnist__errors(tmp_path):
    with pytest.raises(ValueError, match="split='valid'"):
        load_fashion_mnist("valid")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", directory=tmp_path)


def _image_rows(n=6, size=20, mode="RGB"):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    channels = 3 if mode == "RGB" else 1
    rows = []
    for i in range(n):
        pixels = (torch.rand(size, size, channels, generator=g) * 255).to(torch.uint8).squeeze(-1).numpy()
        rows.append({"image": Image.fromarray(pixels, mode=mode), "label": i % 3})
    return rows


def test_load_eval_dataset__save_to_disk_folder_with_grayscale_images(tmp_path):
    import datasets

    rows = _image_rows(mode="L")
    dataset = datasets.Dataset.from_list(
        rows,
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}),
    )
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "disk"))
    model = tiny_models.build("hf_vit", tmp_path)
    loaded = load_eval_dataset(str(tmp_path / "disk"), None, model)
    example = loaded[1]
    assert example["pixel_values"].shape == (3, 16, 16)  # converted to RGB and resized for the model
    assert example["labels"] == 1
    with pytest.raises(ValueError, match="split='train' is not in the dataset; its splits are \\['test'\\]"):
        load_eval_dataset(str(tmp_path / "disk"), "train", model)


def test_hf_image_dataset__missing_label_column():
    import datasets

    dataset = datasets.Dataset.from_list([{"image": row["image"]} for row in _image_rows(2)])
    with pytest.raises(ValueError, match="no label column"):
        HFImageDataset(dataset, lambda image: torch.zeros(3, 4, 4))


def test_load_eval_dataset__unreachable_hub_id():
    with pytest.raises(ValueError, match="could not load dataset 'nobody/no-such-dataset'"):
        load_eval_dataset("nobody/no-such-dataset", None, tiny_models.TinyNet())


@pytest.mark.parametrize("family", ["timm_resnet", "hf_resnet"])
def test_load_classifier__trainer_output_reproduces_logits_with_whitening(tmp_path, family):
    model = tiny_models.build(family, tmp_path)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(32)]
    args = SaliencyDecorConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=16,
        group_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        whiten_head_input=True,
    )
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "out" / "saliency_decor.json").is_file()
    x = torch.randn(5, 3, 16, 16, generator=g)
    model.eval()
    expected = logits_fn(model)(x)
    loaded = load_classifier(tmp_path / "out")
    # The folder holds the plain model, whitening folded into the head (float64 fold, float32 weights).
    torch.testing.assert_close(logits_fn(loaded)(x), expected, rtol=1e-4, atol=1e-4)
    assert not any("saliency_decor_whitening" in name for name, _ in loaded.named_modules())

    # A folder of sd_plugin 0.1.0 (whitening buffers in the weights and beside them, unfolded head)
    # still loads as the trained model: load_classifier re-attaches the whitening.
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(tmp_path / "out", old)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    training = load_file(old / "saliency_decor_whitening.safetensors")
    buffers = {k.removeprefix("whitening."): v for k, v in training.items() if k.startswith("whitening.")}
    if family == "timm_resnet":
        save_file(state, old / "model.safetensors")
    else:
        model.save_pretrained(old, state_dict=state)
    save_file(buffers, old / "saliency_decor_whitening.safetensors")
    metadata = json.loads((old / "saliency_decor.json").read_text())
    del metadata["whitening_folded_into_head"]
    (old / "saliency_decor.json").write_text(json.dumps(metadata))
    torch.testing.assert_close(logits_fn(load_classifier(old))(x), expected, rtol=1e-5, atol=1e-5)


def test_load_classifier__errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_classifier(tmp_path / "empty")
    with pytest.raises(ValueError, match="could not load model 'nobody/no-such-model'"):
        load_classifier("nobody/no-such-model")
