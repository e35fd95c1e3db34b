"""B-cosification (``sd_plugin.core.bcos``): the conversion, its B = 1 equivalence and its explanation."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sd_plugin.core.bcos import (
    BcosConv2d,
    BcosInputEncoding,
    BcosLinear,
    bcos_b,
    bcosify,
    contributions,
    is_bcos,
    set_b,
)
from sd_plugin.evaluation.attribution import saliency_maps


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine values, so that removing centring and β shows."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
    return model.eval()


def _without_what_bcosify_removes(model: nn.Module) -> nn.Module:
    """The original with what the conversion removes zeroed: biases, BatchNorm's centring and β, ReLU6's clip."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.zero_()
            module.bias.data.zero_()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(getattr(module, "act", None), nn.ReLU6):
            module.act = nn.ReLU()
        if isinstance(module, nn.ReLU6):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, child, nn.ReLU())
    return reference


def _hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    return ResNetForImageClassification(config)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    output = model(x)
    return getattr(output, "logits", output)


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet10t", num_classes=3),
        lambda: timm.create_model("efficientnet_lite0", num_classes=3),  # depthwise convolutions, ReLU6
        lambda: timm.create_model("tf_efficientnet_lite0", num_classes=3),  # Conv2dSame: TensorFlow's padding
        _hf_resnet,
    ],
    ids=["timm-resnet10t", "timm-efficientnet-lite0", "timm-tf-efficientnet-lite0", "transformers-resnet"],
)
def test_bcosify__at_b_1_equals_the_original_less_biases_centring_and_relu6_clip(build):
    torch.manual_seed(0)
    original = _randomise_batchnorm(build())
    reference = _without_what_bcosify_removes(original)
    x = torch.randn(2, 3, 49, 49) * 2  # values beyond 6 reach the ReLU6s; odd size: asymmetric "SAME" padding
    with torch.no_grad():
        expected, before = _logits(reference, x), _logits(original, x)
        converted = bcosify(copy.deepcopy(original), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25)).eval()
        got = _logits(converted, x)
    assert is_bcos(converted) and bcos_b(converted) == 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (before - expected).abs().max() > 1e-3  # the removed parts mattered: the test can tell


def test_bcosify__every_layer_is_converted_and_the_head_moves_before_the_pooling():
    model = bcosify(timm.create_model("efficientnet_lite0", num_classes=3), b=2.0)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "Linear", "BatchNormAct2d", "ReLU6"}.isdisjoint(kinds)
    assert isinstance(model.conv_stem, BcosInputEncoding) and model.conv_stem.conv.in_channels == 6
    assert isinstance(model.get_classifier(), BcosLinear) and model.get_classifier().pool_after
    assert all(m.b == 2.0 for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear)))


@pytest.mark.parametrize("groups, stride, dilation", [(1, 1, 1), (8, 2, 1), (2, 1, 2)])
def test_patch_norms__equal_the_norm_of_each_unfolded_patch(groups, stride, dilation):
    conv = BcosConv2d(8, 8, 3, stride=stride, padding=1, dilation=dilation, groups=groups)
    x = torch.randn(2, 8, 9, 9)
    norms = conv.patch_norms(x)
    patches = F.unfold(x, 3, dilation=dilation, padding=1, stride=stride)  # (N, C*9, L)
    per_group = patches.view(2, groups, 8 // groups * 9, -1).pow(2).sum(2).sqrt()  # (N, G, L)
    expected = per_group.repeat_interleave(8 // groups, dim=1).view_as(norms)
    torch.testing.assert_close(norms, expected, atol=1e-5, rtol=1e-4)


class _TwoLayerBcos(nn.Module):
    """Encoding conv (B-cos), ReLU, B-cos classifier at every location then averaged."""

    def __init__(self, b: float) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem = BcosInputEncoding.from_conv(conv, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), b=b)
        self.head = BcosLinear(4, 3, b=b)
        self.head.pool_after = True

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


def test_contributions__equal_the_dynamic_linear_map_computed_by_hand():
    """``W(x)ᵀ [x, 1-x]`` with every ``|cos|^(B-1)`` written out by hand (unfolded patches), then frozen."""
    torch.manual_seed(0)
    b = 2.5
    model = _TwoLayerBcos(b).eval()
    x = torch.randn(2, 3, 6, 6)
    target = torch.tensor([0, 2])
    z = model.stem.encode(x)  # (2, 6, 6, 6): [x, 1 - x] in pixel units
    w, v = model.stem.conv.weight, model.head.weight

    # the scales of this z, by hand
    out = F.conv2d(z, w, padding=1)
    patch_norm = F.unfold(z, 3, padding=1).norm(dim=1).view(2, 1, 6, 6)
    scale1 = (out / (patch_norm * w.flatten(1).norm(dim=1).view(1, -1, 1, 1))).abs().pow(b - 1)
    hidden = torch.relu(scale1 * out)
    gate = (scale1 * out > 0).float()
    h = hidden.permute(0, 2, 3, 1)  # (2, 6, 6, 4)
    scale2 = (
        ((h @ v.T) / (h.norm(dim=-1, keepdim=True) * v.norm(dim=1) + 1e-6)).abs().pow(b - 1)
    )  # 0/0 at a dead location  # (2, 6, 6, 3)

    def frozen(z_: torch.Tensor) -> torch.Tensor:  # linear in z_: the scales and ReLU gates of z held fixed
        h_ = (gate * scale1 * F.conv2d(z_, w, padding=1)).permute(0, 2, 3, 1)
        return (scale2 * (h_ @ v.T)).mean(dim=(1, 2))

    z_leaf = z.clone().requires_grad_(True)
    logits = frozen(z_leaf)
    (weights,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), z_leaf)  # W(x), row of the target
    expected = (weights * z).sum(1)

    got = contributions(model, x, target)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits.detach(), atol=1e-5, rtol=1e-4)  # the hand model is the model
        torch.testing.assert_close(got.sum((1, 2)), model(x).gather(1, target.view(-1, 1)).squeeze(1))


def test_contributions__sum_to_the_logit_of_a_bcosified_network_and_are_the_native_explanation():
    torch.manual_seed(0)
    model = bcosify(timm.create_model("resnet10t", num_classes=3), b=1.5).eval()
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    maps = contributions(model, x, target)
    with torch.no_grad():
        logits = model(x).gather(1, target.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(maps.sum((1, 2)), logits, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(saliency_maps(model, x, target, "native"), maps)
    assert not any(m.detach_dynamic for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear)))


def test_bcosify__refuses_layers_that_are_not_dynamic_linear_and_bad_b():
    with pytest.raises(ValueError, match="SiLU"):
        bcosify(timm.create_model("efficientnet_b0", num_classes=3))
    model = bcosify(timm.create_model("resnet10t", num_classes=3))
    with pytest.raises(ValueError, match="already a B-cos"):
        bcosify(model)
    with pytest.raises(ValueError, match="B must be >= 1"):
        set_b(model, 0.5)
    set_b(model, 2.0)
    assert bcos_b(model) == 2.0
