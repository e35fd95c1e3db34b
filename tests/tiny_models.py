"""Tiny image classifiers of every supported family, saved and reloaded from a folder.

Each factory builds a randomly initialised model, saves it the way it would be published
(``save_pretrained`` / timm's ``save_for_hf``) and loads it back from the folder as a Hub
id would be loaded. ``true_head(model)`` returns the module that really reads the
penultimate features, for checks with a manual hook.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

NUM_CLASSES = 3
IMAGE_SIZE = 16

FAMILIES = (
    "hf_resnet",
    "hf_vit",
    "hf_convnext",
    "hf_timm_wrapper",
    "timm_resnet",
    "timm_vit",
    "peft_hf_vit",
    "peft_timm_resnet",
    "custom",
    "paper_cnn",
)


class TinyNet(nn.Module):
    """A plain classifier whose head is not under a conventional name."""

    def __init__(self, in_chans: int = 3, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Linear(16, 16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.embed(self.body(x))))


def _save_processor(path: Path) -> None:
    """The image processor a Hub checkpoint comes with (resize to the tiny size, scale to [-1, 1])."""
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _hf_resnet(path: Path) -> nn.Module:
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=NUM_CLASSES
    )
    ResNetForImageClassification(config).save_pretrained(path)
    _save_processor(path)
    return AutoModelForImageClassification.from_pretrained(path)


def _hf_vit(path: Path, num_labels: int = NUM_CLASSES) -> nn.Module:
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(path)
    _save_processor(path)
    return AutoModelForImageClassification.from_pretrained(path)


def _hf_convnext(path: Path) -> nn.Module:
    from transformers import AutoModelForImageClassification, ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=NUM_CLASSES)
    ConvNextForImageClassification(config).save_pretrained(path)
    _save_processor(path)
    return AutoModelForImageClassification.from_pretrained(path)


def _hf_timm_wrapper(path: Path) -> nn.Module:
    from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

    TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="resnet10t", num_labels=NUM_CLASSES)
    ).save_pretrained(path)
    _save_processor(path)
    return AutoModelForImageClassification.from_pretrained(path)


def _timm_save_load(model: nn.Module, path: Path, model_args: dict) -> nn.Module:
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(path), model_args=model_args, safe_serialization=True)
    return timm.create_model(f"local-dir:{path}", pretrained=True)


def _timm_resnet(path: Path) -> nn.Module:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=NUM_CLASSES)
    return _timm_save_load(model, path, {})


def _timm_vit(path: Path) -> nn.Module:
    args = dict(img_size=IMAGE_SIZE, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, **args)
    return _timm_save_load(model, path, args)


def _peft_hf_vit(path: Path) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        _hf_vit(path),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "query", "value"], modules_to_save=["classifier"]),
    )


def _peft_timm_resnet(path: Path) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        _timm_resnet(path),
        LoraConfig(r=4, target_modules=[f"layer{i}.0.conv{j}" for i in (1, 2) for j in (1, 2)], modules_to_save=["fc"]),
    )


def _custom(path: Path) -> nn.Module:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(TinyNet().state_dict(), path / "tiny.pt")
    model = TinyNet()
    model.load_state_dict(torch.load(path / "tiny.pt"))
    return model


def _paper_cnn(path: Path) -> nn.Module:
    from sd_plugin.core.models import PaperCNN

    path.mkdir(parents=True, exist_ok=True)
    torch.save(PaperCNN(3, NUM_CLASSES, IMAGE_SIZE, (8, 4)).state_dict(), path / "cnn.pt")
    model = PaperCNN(3, NUM_CLASSES, IMAGE_SIZE, (8, 4))
    model.load_state_dict(torch.load(path / "cnn.pt"))
    return model


_FACTORIES = {
    "hf_resnet": _hf_resnet,
    "hf_vit": _hf_vit,
    "hf_convnext": _hf_convnext,
    "hf_timm_wrapper": _hf_timm_wrapper,
    "timm_resnet": _timm_resnet,
    "timm_vit": _timm_vit,
    "peft_hf_vit": _peft_hf_vit,
    "peft_timm_resnet": _peft_timm_resnet,
    "custom": _custom,
    "paper_cnn": _paper_cnn,
}


def build(family: str, path: Path, seed: int = 0, num_labels: int = NUM_CLASSES) -> nn.Module:
    """A tiny model of ``family``, saved under ``path`` and loaded back (``num_labels``: hf_vit only)."""
    torch.manual_seed(seed)
    if num_labels != NUM_CLASSES:
        if family != "hf_vit":
            raise ValueError("num_labels is only supported for hf_vit")
        return _hf_vit(path / family, num_labels)
    return _FACTORIES[family](path / family)


def train(
    model: nn.Module,
    output_dir: Path,
    steps: int = 1,
    samples: int = 16,
    image_size: int = IMAGE_SIZE,
    **config: object,
):
    """A few ``SaliencyDecorTrainer`` steps on random 16 px images (batch 16, group 8); returns the trainer."""
    from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer

    g = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.randn(3, image_size, image_size, generator=g), "labels": i % 3} for i in range(samples)
    ]
    settings = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=16,
        group_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    args = SaliencyDecorConfig(**{**settings, **config})
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


def train_and_save(model: nn.Module, output_dir: Path, steps: int = 1, samples: int = 16, **config: object):
    """``train``, then ``save_model()``."""
    trainer = train(model, output_dir, steps=steps, samples=samples, **config)
    trainer.save_model()
    return trainer


def feature_layer(family: str) -> str | None:
    return "body" if family == "custom" else None


def true_head(model: nn.Module, family: str) -> nn.Module:
    """The linear layer that actually reads the penultimate features."""
    base = model.get_base_model() if family.startswith("peft") else model
    if family == "hf_resnet":
        return base.classifier[1]
    if family in ("hf_vit", "hf_convnext"):
        return base.classifier
    if family == "peft_hf_vit":
        return base.classifier.modules_to_save["default"]
    if family == "hf_timm_wrapper":
        return base.timm_model.fc
    if family == "timm_resnet":
        return base.fc
    if family == "peft_timm_resnet":
        return base.fc.modules_to_save["default"]
    if family == "timm_vit":
        return base.head
    if family == "custom":
        return base.embed
    if family == "paper_cnn":
        return base.fc
    raise KeyError(family)


def call(model: nn.Module, family: str, x: torch.Tensor) -> torch.Tensor:
    """Logits of the model called the way its library documents."""
    if family.startswith("hf") or family == "peft_hf_vit":
        return model(pixel_values=x).logits
    if family == "paper_cnn":
        return model(x)["logits"]
    return model(x)
