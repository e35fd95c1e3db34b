import pytest
import tiny_models
import torch
from torch import nn

from sd_plugin.core.adapter import adapt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: tiny_models.build(family, root) for family in tiny_models.FAMILIES}


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_adapt__features_are_the_heads_actual_input_and_logits_unchanged(models, family):
    model = models[family].eval()
    adapter = adapt(model, feature_layer=tiny_models.feature_layer(family))
    seen = {}
    handle = tiny_models.true_head(model, family).register_forward_pre_hook(
        lambda module, args: seen.__setitem__("input", args[0].detach().clone())
    )
    x = torch.randn(4, 3, tiny_models.IMAGE_SIZE, tiny_models.IMAGE_SIZE)
    try:
        with torch.no_grad():
            logits, features = adapter.forward_with_features(model, x)
            reference = tiny_models.call(model, family, x)
    finally:
        handle.remove()
        adapter.remove()
    assert features.shape == (4, adapter.num_features)
    torch.testing.assert_close(features, seen["input"].flatten(1))
    torch.testing.assert_close(logits, reference)
    assert adapter.num_classes == tiny_models.NUM_CLASSES


@pytest.mark.parametrize(
    ("family", "transformer"),
    [("hf_resnet", False), ("hf_vit", True), ("timm_vit", True), ("timm_resnet", False), ("peft_hf_vit", True)],
)
def test_adapt__vit_defaults_to_loss_only_whitening_cnn_to_whitened_head(models, family, transformer):
    adapter = adapt(models[family])
    try:
        assert adapter.is_transformer is transformer
        adapter.attach_whitening(group_size=8)
        assert adapter.tap.whiten_head_input is (not transformer)
    finally:
        adapter.remove()
        delattr(adapter.base_model, "saliency_decor_whitening")


def test_adapt__whitened_head_input_changes_logits_in_eval(models):
    model = models["timm_resnet"].eval()
    adapter = adapt(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
        whitening = adapter.attach_whitening(group_size=8, whiten_head_input=True)
        f = adapter.forward_with_features(model, x)[1]
        whitening.train()(f.repeat(8, 1) + torch.randn(32, f.shape[1]))  # running statistics
        whitening.eval()
        whitened = model(x)
        expected = torch.nn.functional.linear(whitening(f), model.fc.weight, model.fc.bias)
    adapter.remove()
    delattr(model, "saliency_decor_whitening")
    assert not torch.allclose(plain, whitened)
    torch.testing.assert_close(whitened, expected)


def test_adapt__error_names_feature_layer_when_head_unknown():
    class Anonymous(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.linear_out = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear_out(self.trunk(x))

    with pytest.raises(ValueError, match=r"feature_layer='<module whose output is the \(B, D\) penultimate"):
        adapt(Anonymous())
    adapter = adapt(Anonymous(), feature_layer="trunk")
    assert adapter.num_features == 4 and adapter.num_classes == 2
    with pytest.raises(ValueError, match="feature_layer='nope' is not a module"):
        adapt(Anonymous(), feature_layer="nope")


def test_adapt__error_model_without_head():
    import timm

    with pytest.raises(ValueError, match="num_labels/num_classes > 0"):
        adapt(timm.create_model("resnet10t", pretrained=False, num_classes=0))


def test_check_batch__errors_name_the_problem(models):
    adapter = adapt(models["timm_resnet"])
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="no labels"):
        adapter.check_batch(x, None)
    with pytest.raises(ValueError, match="1 channels but the model expects 3"):
        adapter.check_batch(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="floating point"):
        adapter.check_batch(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    adapter.remove()
