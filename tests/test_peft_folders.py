"""PEFT adapter folders the package writes rebuild the trained model: resized heads, bases built in code, BatchNorm."""

import json
from pathlib import Path

import pytest
import timm
import tiny_models
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from sd_plugin.hub import export
from sd_plugin.storage.loading import load_classifier
from sd_plugin.storage.peft_folders import BASE_FOLDER, adapter_base


def vit_with_resized_head(tmp_path):
    """A 10-class ViT saved as a Hub checkpoint would be, loaded with a new 3-class head, LoRA on it."""
    from transformers import AutoModelForImageClassification

    tiny_models.build("hf_vit", tmp_path / "ten", num_labels=10)  # with its image processor
    labels = {"id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path / "ten" / "hf_vit", num_labels=3, ignore_mismatched_sizes=True, **labels
    )
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))


def timm_resnet_built_in_code():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)  # nothing names it; BatchNorm statistics
    return get_peft_model(model, LoraConfig(r=4, target_modules=["layer1.0.conv1"], modules_to_save=["fc"]))


def train_and_save(model, tmp_path):
    return tiny_models.train_and_save(model, tmp_path / "run", steps=2, samples=32, learning_rate=1e-2)


def logits_of(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_vit_with_resized_head__adapter_folder_loads_exports_and_reloads_with_plain_libraries(tmp_path):
    trainer = train_and_save(vit_with_resized_head(tmp_path), tmp_path)
    expected = logits_of(trainer.model, X)
    folder = tmp_path / "run"
    assert not (folder / BASE_FOLDER).exists()  # the base is named and has no running statistics
    assert adapter_base(folder).num_classes == 3
    torch.testing.assert_close(logits_of(load_classifier(folder), X), expected, rtol=1e-5, atol=1e-5)
    # plain PEFT + transformers, as the card says: the base with the adapter's head size
    from transformers import AutoModelForImageClassification

    vit10 = tmp_path / "ten" / "hf_vit"
    base = AutoModelForImageClassification.from_pretrained(vit10, num_labels=3, ignore_mismatched_sizes=True)
    torch.testing.assert_close(logits_of(PeftModel.from_pretrained(base, str(folder)), X), expected)
    merged = export(folder, tmp_path / "exported")
    plain = AutoModelForImageClassification.from_pretrained(merged)
    torch.testing.assert_close(logits_of(plain, X), expected, rtol=1e-5, atol=1e-5)
    assert plain.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_timm_base_built_in_code__adapter_folder_carries_its_base_with_the_trained_statistics(tmp_path):
    model = timm_resnet_built_in_code()
    trainer = train_and_save(model, tmp_path)
    expected = logits_of(trainer.model, X)
    folder = tmp_path / "run"
    entry = json.loads((folder / "saliency_decor.json").read_text())["peft_base"]
    assert entry["saved_base"] is True and entry["num_classes"] == 3
    # plain timm + PEFT rebuild the trained model, BatchNorm running statistics included
    base = timm.create_model(f"local-dir:{folder / BASE_FOLDER}", pretrained=True)
    torch.testing.assert_close(logits_of(PeftModel.from_pretrained(base, str(folder)), X), expected)
    merged = export(folder, tmp_path / "exported")
    plain = timm.create_model(f"local-dir:{merged}", pretrained=True)
    torch.testing.assert_close(logits_of(plain, X), expected, rtol=1e-5, atol=1e-5)
    # export(merge_adapter=False) of the folder writes an adapter folder that loads again
    adapter = export(folder, tmp_path / "adapter", merge_adapter=False)
    torch.testing.assert_close(logits_of(load_classifier(adapter), X), expected, rtol=1e-5, atol=1e-5)


def test_adapter_folder_without_a_base__refused_with_the_fix(tmp_path):
    model = timm_resnet_built_in_code()
    model.save_pretrained(tmp_path / "plain_peft")  # PEFT alone: no base name, no base_model/
    with pytest.raises(ValueError, match="names no base_model_name_or_path.*SaliencyDecorTrainer.save_model"):
        load_classifier(tmp_path / "plain_peft")


def test_readme_peft_reload__the_base_as_trained_gives_the_trained_logits(tmp_path, monkeypatch):
    """docs/training.md's PEFT reload (``base_model/``) gives the trained logits; a fresh pretrained base does not."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = (
        readme.split("<!-- peft-reload -->")[1].split("<!-- /peft-reload -->")[0].split("```python")[1].split("```")[0]
    )
    model = tiny_models.build("peft_timm_resnet", tmp_path)
    trainer = tiny_models.train_and_save(model, tmp_path / "lora-out", steps=3, method="sgt")
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(images)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    with torch.no_grad():
        assert (namespace["model"](images) - expected).abs().max() < 1e-5
        fresh = PeftModel.from_pretrained(tiny_models.build("timm_resnet", tmp_path / "fresh"), "lora-out").eval()
        assert (fresh(images) - expected).abs().max() > 1e-3  # the BatchNorm statistics training changed
