"""The grid pointing game and the explanations it scores (Grad-CAM, Input×Gradient) against references."""

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sd_plugin.evaluation.attribution import saliency_maps
from sd_plugin.evaluation.grid_pointing_game import cell_shares, compose_grid, grid_pointing_game, make_grids

SIZE = 8


class TopLeftOnly(nn.Module):
    """Classifies from the top-left ``SIZE x SIZE`` pixels only: on a grid, it looks at cell 0 alone."""

    def __init__(self, classes=4):
        super().__init__()
        self.linear = nn.Linear(3 * SIZE * SIZE, classes)

    def forward(self, x):
        return self.linear(x[..., :SIZE, :SIZE].flatten(1))


def dataset(count=24, classes=4):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, 3, SIZE, SIZE, generator=g), torch.arange(count) % classes)


def test_grids__same_for_a_seed_distinct_classes_and_composed_row_major():
    data = dataset()
    labels = [int(y) for _, y in data]
    first, again, other = make_grids(labels, 10, seed=3), make_grids(labels, 10, seed=3), make_grids(labels, 10, seed=4)
    assert torch.equal(first.indices, again.indices) and not torch.equal(first.indices, other.indices)
    assert all(row.unique().numel() == 4 for row in first.labels)
    assert all(int(data[i][1]) == int(y) for i, y in zip(first.indices.flatten(), first.labels.flatten(), strict=True))
    cells = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    assert compose_grid(cells, 2)[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    with pytest.raises(ValueError, match="needs 9 distinct classes but the dataset has 4"):
        make_grids(labels, 1, n=3)


def test_grid_pointing_game__a_model_looking_at_one_cell_scores_1_there_0_elsewhere():
    torch.manual_seed(0)
    model, data = TopLeftOnly(), dataset()
    grids = make_grids([int(y) for _, y in data], 6, seed=0)
    for attribution in ("gradient", "logit_gradient", "input_x_gradient"):
        result = grid_pointing_game(model, data, grids, attribution=attribution)
        assert torch.allclose(result.scores[:, 0], torch.ones(6, dtype=torch.float64)), attribution
        assert result.scores[:, 1:].abs().max() == 0, attribution
    # disconnected: each cell alone is the model's whole input, the gradient the same weights: exactly chance
    result = grid_pointing_game(model, data, grids, attribution="logit_gradient", disconnected=True)
    assert torch.allclose(result.scores, torch.full_like(result.scores, 0.25))


def test_grid_pointing_game__a_constant_map_scores_chance_and_correct_cells_are_the_cells_classified_alone():
    torch.manual_seed(0)
    model, data = TopLeftOnly(), dataset()
    grids = make_grids([int(y) for _, y in data], 5, seed=1)

    def constant(forward, images, labels):
        return torch.ones(images.shape[0], *images.shape[2:])

    result = grid_pointing_game(model, data, grids, attribution=constant, grids_per_batch=2)
    assert result.mean() == pytest.approx(0.25) and result.chance == 0.25
    images = torch.stack([data[i][0] for i in grids.indices.flatten().tolist()])
    predicted = model(images).argmax(-1).view(5, 4)
    assert torch.equal(result.correct, predicted == grids.labels)
    summary = result.to_dict()
    assert summary["cells"] == 20 and len(summary["scores"]) == 5 and summary["attribution"] == "constant"


def test_cell_shares__positive_part_only():
    maps = torch.tensor([[[1.0, -3.0], [0.0, 3.0]]])
    assert cell_shares(maps, 2).tolist() == [[0.25, 0.0, 0.0, 0.75]]
    assert cell_shares(-maps.abs(), 2).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_input_x_gradient__equals_the_product_by_hand_and_captum():
    attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    inputs = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(inputs).gather(1, y.view(-1, 1)).sum(), inputs)
    maps = saliency_maps(model, x, y, "input_x_gradient")
    assert torch.allclose(maps, (x * grad).sum(1), atol=1e-12)
    assert torch.allclose(maps, attr.InputXGradient(model).attribute(x, target=y).sum(1), atol=1e-12)


def test_gradcam__equals_captum_layer_gradcam_on_a_timm_resnet():
    attr = pytest.importorskip("captum.attr")
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 3, 4])
    maps = saliency_maps(model, x, y, "gradcam")
    from sd_plugin.evaluation.gradcam import gradcam_layer

    layer = model.get_submodule(gradcam_layer(model, x))
    assert layer is model.layer4  # the last stage: what the head pools
    reference = attr.LayerGradCam(model, layer).attribute(x, target=y, relu_attributions=True)
    reference = attr.LayerAttribution.interpolate(reference, (64, 64), "bilinear")[:, 0]
    assert reference.abs().max() > 0
    assert torch.allclose(maps, reference, atol=1e-5)


@pytest.mark.parametrize("family", ["hf_vit", "timm_vit"])
def test_gradcam__vit_tokens_on_the_patch_grid_equal_a_hand_computation(family, tmp_path):
    model = tiny_models.build(family, tmp_path).eval()
    x, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    maps = saliency_maps(model, x, y, "gradcam")
    from sd_plugin.evaluation.gradcam import gradcam_layer

    name = gradcam_layer(model, x)
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(o))
    logits = model(pixel_values=x).logits if family == "hf_vit" else model(x)
    handle.remove()
    tokens = captured[-1]
    (grad,) = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), tokens)
    assert tokens.shape[1] == 1 + 16  # a class token, then the 4 x 4 patch grid
    acts = tokens[:, 1:].detach().transpose(1, 2).reshape(2, -1, 4, 4)
    grads = grad[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    reference = F.interpolate(cam, size=(16, 16), mode="bilinear")[:, 0]
    assert grad[:, 1:].abs().sum() > 0  # the patch tokens reach the class token after this layer
    assert torch.allclose(maps, reference, atol=1e-5)


def test_evaluate_cli__grid_pointing_game_same_grids_for_every_model(tmp_path, capsys):
    """``evaluate --grid-pointing-game`` scores each model on the same grids, per cell, beside chance."""
    import json

    import timm

    from sd_plugin.__main__ import main as cli

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
        folder = tmp_path / f"m{seed}"
        from safetensors.torch import save_file

        from sd_plugin.core.families import write_timm_config

        folder.mkdir()
        save_file(model.state_dict(), folder / "model.safetensors")
        write_timm_config(model, folder, input_size=[3, 16, 16])
        folders.append(folder)
    flags = ["--dataset", "digits", "--max-images", "20", "--step", "50", "--no-road", "--no-progress"]
    flags += ["--attribution", "gradcam", "--grid-pointing-game", "6", "--grid-disconnected"]
    out = tmp_path / "eval"
    assert (
        cli(["evaluate", "--model", str(folders[0]), "--compare", str(folders[1]), "--output-dir", str(out), *flags])
        == 0
    )
    assert "GridPG" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    first, second = (results["models"][name] for name in results["models"])
    assert first["grid_pointing_game_cells"]["chance"] == 0.25
    assert len(first["grid_pointing_game_cells"]["scores"]) == 6
    assert first["grid_pointing_game_cells"]["attribution"] == "gradcam"
    assert "grid_pointing_game_disconnected_correct" in second
    assert set(first) <= set(results["metrics"]) | set(results["fields"])
