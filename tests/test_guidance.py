"""The Energy loss and its controls (``core.guidance``), and the B-cos / guidance settings of the training step."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt
from sd_plugin.core.bcos import bcos_b, bcosify, contributions, is_bcos
from sd_plugin.core.guidance import (
    centred_disc_masks,
    energy_loss,
    gradcam_map,
    input_x_gradient_map,
    recording_feature_map,
    shuffle_masks,
)
from sd_plugin.core.training_step import classification_loss
from sd_plugin.evaluation.gradcam import grad_cam
from tests.tiny_models import train


def _left_half_masks(n: int, size: int = 32) -> torch.Tensor:
    masks = torch.zeros(n, size, size)
    masks[:, :, : size // 2] = 1
    return masks


def test_energy_loss__is_one_minus_the_positive_share_inside_over_annotated_images():
    maps = torch.tensor([[[2.0, -5.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 4.0], [0.0, 0.0]]])
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    # image 0: positive 2 inside of 4 -> 0.5; image 1 all ones: not annotated; image 2: all inside -> 0
    assert float(energy_loss(maps, masks)) == pytest.approx((0.5 + 0.0) / 2)
    coarse = energy_loss(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))  # mask averaged to 1x2
    assert float(coarse) == pytest.approx(1 - 1 / 4)
    none_annotated = energy_loss(maps, torch.ones_like(masks))
    assert float(none_annotated) == 0.0


def test_energy_controls__shuffled_masks_move_and_the_centred_disc_has_the_mean_area():
    masks = torch.zeros(3, 40, 40)
    masks[0, :10, :10] = 1  # area 100
    masks[1, 20:, 20:] = 1  # area 400
    masks[2] = 1  # not annotated
    shuffled = shuffle_masks(masks)
    assert all(not torch.equal(shuffled[i], masks[i]) for i in range(3))
    discs = centred_disc_masks(masks)
    assert torch.equal(discs[0], discs[1]) and torch.equal(discs[2], masks[2])
    assert float(discs[0].sum()) == pytest.approx(250, rel=0.08)
    assert float(discs[0][20, 20]) == 1 and float(discs[0][0, 0]) == 0  # centred


def test_input_x_gradient_map__equals_captum_and_keeps_its_graph():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).eval()
    x, y = torch.randn(2, 3, 32, 32, requires_grad=True), torch.tensor([0, 2])
    maps = input_x_gradient_map(model(x), x, y)
    expected = captum.InputXGradient(model).attribute(x.detach().clone(), target=y).sum(1)
    torch.testing.assert_close(maps.detach(), expected, atol=1e-6, rtol=1e-4)
    assert maps.requires_grad


def test_gradcam_map__equals_the_evaluation_gradcam_at_the_last_feature_map():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    with recording_feature_map(model) as maps:
        logits = model(x)
    coarse = gradcam_map(logits, maps[-1], y)
    assert coarse.requires_grad and coarse.shape == (2, 2, 2)
    reference = grad_cam(model, x, y, layer="layer4")  # upsampled to 64 x 64
    upsampled = F.interpolate(coarse.detach().unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled.squeeze(1), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", ["input", "features"])
def test_energy_term__trains_the_explanation_into_the_masks(layer):
    """A few steps on one batch lower the Energy loss; the same steps without it do not."""
    torch.manual_seed(0)
    size = 32 if layer == "input" else 64  # resnet10t's last map: 2 x 2 at 64 px
    x, y = torch.randn(8, 3, size, size), torch.arange(8) % 3
    masks = _left_half_masks(8, size)

    def energy_after(weight: float) -> tuple[float, float]:
        """(first, last) Energy loss over 12 Adam steps; weight 1e-9 trains as plain while logging the loss."""
        torch.manual_seed(1)
        model = timm.create_model("resnet10t", num_classes=3)
        step = SaliencyDecorStep(
            adapt(model), SaliencyDecorArguments(method="baseline", energy_weight=weight, energy_layer=layer)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(12):
            optimizer.zero_grad()
            losses.append(float(step.step(model, x, y, object_masks=masks).loss_energy))
            optimizer.step()
        return losses[0], float(step.step(model, x, y, object_masks=masks).loss_energy)

    start, guided = energy_after(5.0)
    _, plain = energy_after(1e-9)
    assert guided < start - 0.1 and guided < plain - 0.1


def test_energy_term__needs_masks_and_the_controls_change_the_loss():
    model = timm.create_model("resnet10t", num_classes=3)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % 3
    with pytest.raises(ValueError, match="energy_weight=1.0.*no 'masks'"):
        SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method="baseline", energy_weight=1.0)).step(model, x, y)
    masks = torch.zeros(4, 32, 32)
    masks[0, :8, :8] = masks[1, 24:, 24:] = masks[2, :8, 24:] = masks[3, 24:, :8] = 1
    losses = {}
    for kind in ("given", "shuffled", "centred"):
        step = SaliencyDecorStep(
            adapt(model), SaliencyDecorArguments(method="baseline", energy_weight=1.0, guidance_masks=kind)
        )
        losses[kind] = float(step.compute_loss(model, x, y, object_masks=masks)[1].loss_energy)
    assert len({round(v, 6) for v in losses.values()}) == 3


def test_energy_term__features_layer_without_a_global_pooling_is_refused_when_the_step_is_built():
    from sd_plugin.core.models import PaperCNN

    model = PaperCNN.mnist()
    args = SaliencyDecorArguments(method="baseline", energy_weight=1.0, energy_layer="features")
    with pytest.raises(ValueError, match="no global pooling.*use energy_layer='input'"):
        SaliencyDecorStep(adapt(model), args)  # before any batch, not at the first step


def test_classification_loss__binary_cross_entropy_with_the_logit_bias_by_hand():
    logits, labels = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]), torch.tensor([2, 0])
    bias = -math.log(2)
    z = logits + bias
    expected = []
    for i, label in enumerate(labels):
        terms = [
            -(torch.log(torch.sigmoid(z[i, k])) if k == label else torch.log(1 - torch.sigmoid(z[i, k])))
            for k in range(3)
        ]
        expected.append(sum(terms))
    torch.testing.assert_close(classification_loss(logits, labels, "binary_cross_entropy"), torch.stack(expected))
    # at zero logits each class has probability 1/C
    assert float(torch.sigmoid(torch.tensor(bias))) == pytest.approx(1 / 3)


def test_bcos_step__raises_b_over_the_warmup_and_refuses_a_plain_model():
    model = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="not a B-cos network"):
        SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method="baseline", bcos_b=2.0))
    with pytest.raises(ValueError, match="bcos_b=2.0 with method='saliencydecor'"):
        SaliencyDecorArguments(bcos_b=2.0, method="saliencydecor")
    bcosify(model)
    step = SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method="baseline", bcos_b=2.0, bcos_warmup_steps=4))
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % 3
    seen = []
    for index in range(6):
        step.step(model, x, y, step_index=index)
        seen.append(bcos_b(model))
    assert seen == [1.25, 1.5, 1.75, 2.0, 2.0, 2.0]


def test_trainer__bcos_b_bcosifies_and_fine_tunes_the_model(tmp_path):
    model = timm.create_model("resnet10t", num_classes=3)
    trainer = train(model, tmp_path, steps=2, method="baseline", bcos_b=2.0, classification_loss="binary_cross_entropy")
    assert is_bcos(trainer.model) and bcos_b(trainer.model) == 2.0
    assert trainer.state.log_history[-1]["train_loss"] > 0


_FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import bcos  # the copy beside the weights: torch + timm + safetensors only
model = bcos.load_timm_folder(sys.argv[1])
x = torch.load(sys.argv[2])
maps = bcos.contributions(model, x, torch.tensor([0, 1]))
torch.save({"logits": model(x).detach(), "maps": maps, "sd_plugin": "sd_plugin" in sys.modules}, sys.argv[3])
"""


def test_bcos_efficientnet_lite0__fine_tunes_exports_and_explains_in_a_fresh_process_without_the_package(tmp_path):
    import subprocess
    import sys

    from sd_plugin.hub.export import export
    from sd_plugin.storage.loading import load_classifier

    model = timm.create_model("tf_efficientnet_lite0", num_classes=3)  # Conv2dSame, depthwise, ReLU6
    trainer = train(model, tmp_path / "run", steps=2, samples=8, image_size=64, method="baseline", bcos_b=2.0)
    trainer.save_model()
    folder = export(trainer, tmp_path / "exported")
    assert {"bcos.json", "bcos.py", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    assert "bcos.load_timm_folder" in (folder / "README.md").read_text()  # the card says how to load and explain
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    trained = trainer.model.eval()
    expected_logits, expected_maps = trained(x).detach(), contributions(trained, x, torch.tensor([0, 1]))

    for saved in (tmp_path / "run", folder):  # the Trainer's folder and the export reload through the package
        reloaded = load_classifier(saved)
        assert is_bcos(reloaded) and bcos_b(reloaded) == 2.0
        torch.testing.assert_close(reloaded(x), expected_logits, atol=1e-5, rtol=1e-4)
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH_PROCESS)
    subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")], check=True
    )
    out = torch.load(tmp_path / "out.pt")
    assert not out["sd_plugin"]
    torch.testing.assert_close(out["logits"], expected_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["maps"], expected_maps, atol=1e-6, rtol=1e-4)


def test_readme__the_bcos_and_guidance_settings_snippet_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    block = readme.split("<!-- bcos-config -->")[1].split("<!-- /bcos-config -->")[0]
    code = block.split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    assert namespace["config"].energy_weight == 5.0
