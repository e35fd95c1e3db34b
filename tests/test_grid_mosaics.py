"""GridMosaics: guidance masks from class labels alone (sd_plugin.storage.grid_mosaics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt
from sd_plugin.storage.grid_mosaics import GridMosaics


class ConstantImages(Dataset):
    """Image ``i`` is filled with the value ``i``; label ``i % classes``; a ``reseed`` that records its seed."""

    def __init__(self, count: int = 12, classes: int = 4, size: int = 8) -> None:
        self.labels = torch.arange(count) % classes
        self.size, self.seeds = size, []

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        self.seeds.append(seed)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": torch.full((3, self.size, self.size), float(index)), "labels": int(self.labels[index])}


class NoiseImages(ConstantImages):
    """Image ``i`` is Gaussian noise seeded by ``i``."""

    def __getitem__(self, index: int) -> dict:
        noise = torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(index))
        return {"pixel_values": noise, "labels": int(self.labels[index])}


def _cells(image: torch.Tensor, n: int) -> torch.Tensor:
    """``(n², C)``: the mean of each cell, row-major."""
    return F.adaptive_avg_pool2d(image, n).flatten(1).T


def test_mosaic__own_cell_holds_the_target_image_shrunk_and_the_others_hold_distinct_classes():
    data = ConstantImages()
    mosaics = GridMosaics(data, probability=1.0, seed=0)
    for index in range(len(data)):
        item = mosaics[index]
        assert item["labels"] == int(data.labels[index])
        assert item["masks"].shape == (8, 8) and item["masks"].dtype == torch.bool
        inside = item["pixel_values"][:, item["masks"]]
        assert torch.equal(inside, torch.full_like(inside, float(index)))  # constant images shrink to themselves
        values = _cells(item["pixel_values"], 2)[:, 0].long()
        assert sorted(int(data.labels[v]) for v in values) == [0, 1, 2, 3]  # four distinct classes


def test_mosaic__shrinks_each_image_by_area_average_into_its_cell():
    class Ramp(ConstantImages):
        def __getitem__(self, index: int) -> dict:
            image = torch.arange(64.0).view(1, 8, 8).expand(3, 8, 8) + 100 * index
            return {"pixel_values": image.clone(), "labels": int(self.labels[index])}

    item = GridMosaics(Ramp(), probability=1.0, seed=3)[5]
    rows, cols = item["masks"].nonzero().unbind(1)
    cell = item["pixel_values"][0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    expected = F.avg_pool2d(Ramp()[5]["pixel_values"][:1], 2)[0]  # by hand: means of 2 × 2 blocks
    assert torch.allclose(cell, expected)


def test_mosaic__probability_is_the_annotated_share_and_plain_items_have_all_ones_masks():
    data = ConstantImages(count=400)
    mosaics = GridMosaics(data, probability=0.25, seed=1)
    annotated = []
    for index in range(len(data)):
        item = mosaics[index]
        is_mosaic = not bool(item["masks"].all())
        annotated.append(is_mosaic)
        if not is_mosaic:
            assert torch.equal(item["pixel_values"], data[index]["pixel_values"])
        else:
            assert int(item["masks"].sum()) == 16
    assert abs(sum(annotated) / len(annotated) - 0.25) < 0.06


def test_mosaic__the_other_cell_control_marks_another_class_and_the_same_seed_draws_the_same_mosaics():
    data = ConstantImages()
    controls = GridMosaics(data, 1.0, mask_cell="other", seed=7)
    for index in range(len(data)):
        control = controls[index]
        inside = control["pixel_values"][:, control["masks"]]
        assert float(inside.mean()) != float(index)  # the mask lies on a neighbour's cell
        assert inside.unique().numel() == 1
        assert int(data.labels[int(inside[0, 0])]) != int(data.labels[index])
    first = [item["pixel_values"] for item in GridMosaics(data, 1.0, seed=2)]
    mosaics = GridMosaics(data, 1.0, seed=5)
    mosaics.reseed(2)
    assert all(torch.equal(a, b["pixel_values"]) for a, b in zip(first, mosaics, strict=False))
    assert data.seeds == [2]  # the wrapped dataset's crops and flips are reseeded too


def test_mosaic__bad_arguments_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="probability=0"):
        GridMosaics(ConstantImages(), probability=0)
    with pytest.raises(ValueError, match="mask_cell='left'"):
        GridMosaics(ConstantImages(), probability=1, mask_cell="left")
    with pytest.raises(ValueError, match="n=2: a mosaic needs 4 distinct classes"):
        GridMosaics(ConstantImages(classes=3), probability=1)
    with pytest.raises(ValueError, match=r"n=3: the images \(8 × 8\)"):
        GridMosaics(ConstantImages(classes=9, count=18), probability=1, n=3)[0]


def test_mosaic__batches_train_the_energy_loss_onto_the_target_cell():
    """The mosaics' masks reach the step through a DataLoader and the Energy loss on Grad-CAM falls with training."""
    torch.manual_seed(0)
    data = NoiseImages(count=16, size=64)
    batch = next(iter(DataLoader(GridMosaics(data, 1.0, seed=0), batch_size=16)))
    model = timm.create_model("resnet10t", num_classes=4)
    step = SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method="baseline", energy_weight=5.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        result = step.step(model, batch["pixel_values"], batch["labels"], object_masks=batch["masks"])
        losses.append(float(result.loss_energy))
        optimizer.step()
    assert losses[-1] < losses[0] - 0.2


def test_docs__the_grid_mosaics_snippet_wraps_a_dataset_as_written():
    """docs/training.md's GridMosaics line turns a labelled dataset into one whose items carry masks."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = (
        page.split("<!-- grid-mosaics -->")[1].split("<!-- /grid-mosaics -->")[0].split("```python")[1].split("```")[0]
    )
    namespace = {"train_dataset": ConstantImages(count=40)}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    items = [namespace["train_dataset"][i] for i in range(40)]
    assert {tuple(item) for item in items} == {("pixel_values", "labels", "masks")}
    assert 0 < sum(not bool(item["masks"].all()) for item in items) < 40
