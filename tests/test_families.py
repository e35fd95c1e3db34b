"""Issue 21, item 2: a model family is one ``ModelFamily`` subclass; the adapter, the step and export ask it."""

import json

import torch
from torch import nn

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt
from sd_plugin.core import families
from sd_plugin.hub import export
from sd_plugin.storage.loading import load_classifier


class KeywordNet(nn.Module):
    """A classifier of a made-up library: called as ``model(images=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 3)

    def forward(self, *, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(images))


class KeywordFamily(families.ModelFamily):
    name = "keyword"
    hub_library = "keyword-lib"

    def matches(self, model):
        return isinstance(model, KeywordNet)

    def call(self, model, pixel_values):
        return model(images=pixel_values)

    def write_config(self, model, folder, *, input_size=None):
        (folder / "config.json").write_text(json.dumps({"architecture": "KeywordNet", "input_size": input_size}))

    def reads_folder(self, config):
        return config.get("architecture") == "KeywordNet"

    def load_folder(self, folder, config, **kwargs):
        from safetensors.torch import load_file

        model = KeywordNet()
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model

    def usage(self, model_class, has_processor=True):
        return "import keyword_lib\nmodel = keyword_lib.load('<repo_id>')"


def test_a_new_family_is_one_subclass(monkeypatch, tmp_path):
    monkeypatch.setattr(families, "FAMILIES", (KeywordFamily(), *families.FAMILIES))
    model = KeywordNet()
    adapter = adapt(model)
    assert adapter.library == "keyword" and adapter.num_features == 8 and adapter.num_classes == 3
    step = SaliencyDecorStep(adapter, SaliencyDecorArguments(method="saliencydecor", group_size=4))
    out = step.step(model, torch.randn(8, 3, 12, 12), torch.arange(8) % 3)  # both passes call model(images=...)
    assert out.loss_kl is not None and out.loss_decor is not None
    folder = export(model, tmp_path / "exported")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "KeywordNet"
    card = (folder / "README.md").read_text()
    assert "library_name: keyword-lib" in card and "keyword_lib.load" in card
    reloaded = load_classifier(folder)  # the loaders ask the family too
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(reloaded(images=x), model.eval()(images=x))
