import pytest
import torch

from sd_plugin.storage.cluttered_digits import MaskedTensorImageDataset, cluttered_digits_splits, compose_cluttered


def _constant_pool(count: int, size: int) -> torch.Tensor:
    """Digit k is the constant (k + 1) / count: which digit a pixel came from can be read back."""
    return (torch.arange(count, dtype=torch.float32) + 1).div(count).view(count, 1, 1, 1).expand(count, 1, size, size)


def test_compose__mask_is_the_digits_square_and_clutter_comes_from_other_digits():
    pool = _constant_pool(6, 4)
    shown = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5])
    canvases, masks = compose_cluttered(pool, shown, 12, fragments=3, fragment_size=2, generator=torch.Generator())
    for canvas, mask, own in zip(canvases[:, 0], masks, shown.tolist(), strict=True):
        rows, cols = mask.nonzero(as_tuple=True)
        assert mask.sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3  # a 4x4 square
        assert (canvas[mask] >= pool[own, 0, 0, 0]).all()  # the digit is pasted last: never covered
        outside = canvas[~mask]
        assert (outside > 0).any()  # some clutter lies outside the digit (3 fragments on 12x12)
        assert not torch.isclose(outside, pool[own, 0, 0, 0]).any()  # none of it is the canvas's own digit


def test_compose__refuses_sizes_that_do_not_fit():
    pool = torch.rand(3, 1, 6, 6)
    with pytest.raises(ValueError, match="fragment_size"):
        compose_cluttered(pool, torch.tensor([0]), 12, 2, 7, torch.Generator())
    with pytest.raises(ValueError, match="canvas_size"):
        compose_cluttered(pool, torch.tensor([0]), 6, 2, 3, torch.Generator())
    with pytest.raises(ValueError, match="at least 2 digits"):
        compose_cluttered(pool[:1], torch.tensor([0]), 12, 2, 3, torch.Generator())


def test_splits__deterministic_copies_and_range():
    train, test = cluttered_digits_splits(train_copies=2, seed=0)
    again, _ = cluttered_digits_splits(train_copies=2, seed=0)
    assert len(train) == 2 * (1797 - len(test)) and len(test) == 359
    assert torch.equal(train.images, again.images) and torch.equal(train.masks, again.masks)
    half = len(train) // 2
    assert torch.equal(train.labels[:half], train.labels[half:])  # the copies show the same digits...
    assert not torch.equal(train.masks[:half], train.masks[half:])  # ...elsewhere on the canvas
    assert train.images.min() >= -1 and train.images.max() <= 1
    item = test[3]
    assert set(item) == {"pixel_values", "labels", "masks"} and item["masks"].dtype == torch.bool
    with pytest.raises(ValueError, match="train_copies"):
        cluttered_digits_splits(train_copies=0)


def test_masked_dataset__checks_mask_shape():
    with pytest.raises(ValueError, match="do not match"):
        MaskedTensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 5, 5))
