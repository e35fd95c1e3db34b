import pytest
import torch

from sd_plugin.core.masking import (
    MASK_FILLS,
    fill_values,
    lowest_saliency_mask,
    mask_least_salient,
    pixel_saliency,
)


def naive_mask(saliency: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-sample loop with a full sort: the reference."""
    b, h, w = saliency.shape
    count = int(ratio * h * w + 0.5)  # round half up
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    for i in range(b):
        order = sorted(range(h * w), key=lambda p: float(saliency[i].flatten()[p]))
        mask[i, order[:count]] = True
    return mask.view(b, h, w)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.99])
def test_mask__exact_count_and_lowest_saliency(ratio, generator):
    saliency = torch.rand(6, 7, 9, generator=generator)
    mask = lowest_saliency_mask(saliency, ratio)
    assert (mask.flatten(1).sum(1) == int(ratio * 63 + 0.5)).all()
    assert torch.equal(mask, naive_mask(saliency, ratio))


@pytest.mark.parametrize("fill", MASK_FILLS)
def test_mask_least_salient__replaces_only_masked_pixels(fill, generator):
    images = torch.randn(4, 3, 8, 8, generator=generator)
    saliency = pixel_saliency(torch.randn(4, 3, 8, 8, generator=generator))
    masked, mask = mask_least_salient(images, saliency, 0.25, fill, generator=generator)
    keep = ~mask.unsqueeze(1).expand_as(images)
    assert torch.equal(masked[keep], images[keep])
    assert int(mask.sum()) == 4 * 16
    assert not masked.requires_grad


def test_fill_random__inside_per_sample_channel_range(generator):
    images = torch.randn(5, 3, 10, 10, generator=generator) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    fill = fill_values(images, "random", generator)
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    assert (fill >= low).all() and (fill <= high).all()
    assert fill.std() > 0


def test_fill_mean_zero_blur__documented_values(generator):
    images = torch.rand(2, 3, 12, 12, generator=generator)
    torch.testing.assert_close(fill_values(images, "mean"), images.mean((2, 3), keepdim=True).expand_as(images))
    assert torch.equal(fill_values(images, "zero"), torch.zeros_like(images))
    blurred = fill_values(images, "blur")
    assert blurred.shape == images.shape
    assert blurred.std() < images.std()  # smoother
    constant = torch.full((1, 3, 12, 12), 0.7)
    torch.testing.assert_close(fill_values(constant, "blur"), constant)  # normalised kernel


def test_pixel_saliency__channel_mean_of_abs():
    grad = torch.tensor([[[[1.0, -2.0]], [[-3.0, 4.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(pixel_saliency(grad), torch.tensor([[[2.0, 3.0]]]))


def test_errors__ratio_and_fill():
    with pytest.raises(ValueError, match=r"ratio=1.0 is out of range; use a fraction in \[0, 1\)"):
        lowest_saliency_mask(torch.rand(1, 4, 4), 1.0)
    with pytest.raises(ValueError, match="fill='noise'"):
        fill_values(torch.rand(1, 3, 4, 4), "noise")
