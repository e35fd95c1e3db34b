"""``mask_selection="random"``: the explanation-agnostic control of saliency-guided masking."""

import pytest
import tiny_models
import torch

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep
from sd_plugin.core.adapter import adapt
from sd_plugin.core.masking import num_masked_pixels


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(8, 3, 16, 16, generator=g) + 0.5, torch.randint(0, 3, (8,), generator=g)


def masked_pass_inputs(model, selection, method="sgt", fill="zero", seed=0, consistency_grad="detached"):
    """(clean-pass input, masked-pass input) of one step."""
    arguments = SaliencyDecorArguments(
        method=method, mask_selection=selection, mask_fill=fill, group_size=8, consistency_grad=consistency_grad
    )
    step = SaliencyDecorStep(
        adapt(model, feature_layer="body"), arguments, generator=torch.Generator().manual_seed(seed)
    )
    seen = []
    handle = model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images, labels = batch()
    step.step(model, images, labels)
    handle.remove()
    return seen[0], seen[1].detach(), images


@pytest.mark.parametrize("consistency_grad", ["detached", "both"])
def test_random_masks__same_fraction_and_fill_as_sgt_and_no_input_gradient(consistency_grad):
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    clean, masked, images = masked_pass_inputs(model, "random", consistency_grad=consistency_grad)
    assert not clean.requires_grad  # the clean pass takes no input gradient
    torch.manual_seed(0)
    _, sgt_masked, _ = masked_pass_inputs(tiny_models.TinyNet(), "least_salient", consistency_grad=consistency_grad)
    count = num_masked_pixels(0.25, 16 * 16)
    for masked_images in (masked, sgt_masked):  # zero fill: masked pixels are 0 in every channel
        removed = (masked_images == 0).all(1)
        assert removed.flatten(1).sum(1).tolist() == [count] * 8
        torch.testing.assert_close(
            masked_images[~removed.unsqueeze(1).expand_as(images)], images[~removed.unsqueeze(1).expand_as(images)]
        )


def test_random_masks__random_fill_stays_in_each_images_range():
    torch.manual_seed(0)
    _, masked, images = masked_pass_inputs(tiny_models.TinyNet(), "random", fill="random")
    changed = (masked != images).any(1)
    assert changed.flatten(1).sum(1).max() <= num_masked_pixels(0.25, 256)
    low, high = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    assert bool(((masked >= low) & (masked <= high)).all())


def test_random_masks__do_not_depend_on_the_saliency_and_follow_the_seed():
    masks = []
    for model_seed in (0, 1):  # two models: different input gradients
        torch.manual_seed(model_seed)
        _, masked, _ = masked_pass_inputs(tiny_models.TinyNet(), "random", seed=5)
        masks.append((masked == 0).all(1))
    assert torch.equal(masks[0], masks[1])
    torch.manual_seed(0)
    _, other_seed, _ = masked_pass_inputs(tiny_models.TinyNet(), "random", seed=6)
    assert not torch.equal(masks[0], (other_seed == 0).all(1))
    sgt = []
    for model_seed in (0, 1):
        torch.manual_seed(model_seed)
        _, masked, _ = masked_pass_inputs(tiny_models.TinyNet(), "least_salient", seed=5)
        sgt.append((masked == 0).all(1))
    assert not torch.equal(sgt[0], sgt[1])  # saliency-guided masks do follow the model


def test_mask_selection__validated_and_recorded_in_the_settings():
    with pytest.raises(ValueError, match="mask_selection='best'"):
        SaliencyDecorArguments(mask_selection="best")
    step = SaliencyDecorStep(
        adapt(tiny_models.TinyNet(), feature_layer="body"),
        SaliencyDecorArguments(method="sgt", mask_selection="random"),
    )
    assert step.settings()["mask_selection"] == "random"


def test_model_card__names_the_random_mask_control():
    from sd_plugin.hub.card import render_model_card

    metadata = SaliencyDecorArguments(method="sgt", mask_selection="random").to_dict()
    card = render_model_card("m", "timm", metadata)
    assert "**Control run:**" in card and "| mask_selection | random |" in card.replace("`", "")
    guided = render_model_card("m", "timm", SaliencyDecorArguments(method="sgt").to_dict())
    assert "Control run" not in guided
