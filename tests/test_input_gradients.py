"""Adversarial training, input-gradient regularisation and RRR against reference computations."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep, adapt
from sd_plugin.core.input_gradients import (
    adversarial_perturbation,
    explanation_penalty,
    finite_difference_gradient_penalty,
    input_gradient_penalty,
)


def linear_problem(seed=0, batch=5, classes=4):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, 2 * 3 * 3, generator=g, dtype=torch.float64)
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    x = torch.randn(batch, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return weight, bias, x, y


def linear_logits(weight, bias):
    return lambda images: images.flatten(1) @ weight.T + bias


def closed_form_ce_gradient(weight, bias, x, y):
    """d CE_i / d x_i = W^T (softmax(W x_i + b) - onehot(y_i)), per sample, shaped like x."""
    p = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    return ((p - F.one_hot(y, weight.shape[0]).double()) @ weight).view_as(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_step_attack__is_the_fgsm_formula(norm):
    weight, bias, x, y = linear_problem()
    delta = adversarial_perturbation(linear_logits(weight, bias), x, y, epsilon=0.2, norm=norm, random_start=False)
    grad = closed_form_ce_gradient(weight, bias, x, y)
    if norm == "linf":
        expected = 0.2 * grad.sign()  # step 1.25 eps, clipped to eps
    else:
        expected = 0.2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)  # the loss is taken in float32


def naive_pgd(weight, bias, x, y, epsilon, norm, steps, step_size):
    """PGD one image at a time, the textbook loop."""
    out = []
    for image, label in zip(x, y, strict=True):
        delta = torch.zeros_like(image)
        for _ in range(steps):
            g = closed_form_ce_gradient(weight, bias, (image + delta)[None], label[None])[0]
            if norm == "linf":
                delta = (delta + step_size * g.sign()).clamp(-epsilon, epsilon)
            else:
                delta = delta + step_size * g / g.norm()
                delta = delta * min(1.0, epsilon / float(delta.norm()))
        out.append(delta)
    return torch.stack(out)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd__matches_the_per_image_loop_and_stays_in_the_ball(norm):
    weight, bias, x, y = linear_problem(seed=1)
    logits_of = linear_logits(weight, bias)
    delta = adversarial_perturbation(logits_of, x, y, epsilon=0.5, norm=norm, steps=4, random_start=False)
    torch.testing.assert_close(delta, naive_pgd(weight, bias, x, y, 0.5, norm, 4, 2.5 * 0.5 / 4))
    started = adversarial_perturbation(logits_of, x, y, epsilon=0.5, norm=norm, steps=2, random_start=True)
    size = started.abs().flatten(1).amax(1) if norm == "linf" else started.flatten(1).norm(dim=1)
    assert bool((size <= 0.5 + 1e-9).all())
    loss = lambda d: F.cross_entropy(logits_of(x + d), y)  # noqa: E731
    assert loss(delta) > loss(torch.zeros_like(x))  # the attack raises the loss


def test_input_gradient_penalty__closed_form_and_finite_difference():
    weight, bias, x, y = linear_problem(seed=2)
    weight.requires_grad_(True)
    inputs = x.clone().requires_grad_(True)
    per_sample = F.cross_entropy(linear_logits(weight, bias)(inputs), y, reduction="none")
    exact = input_gradient_penalty(per_sample.sum(), inputs)
    expected = closed_form_ce_gradient(weight.detach(), bias, x, y).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(exact.double(), expected, rtol=1e-5, atol=0)  # the loss is taken in float32
    (exact_grad,) = torch.autograd.grad(exact, weight)

    inputs = x.clone().requires_grad_(True)
    per_sample = F.cross_entropy(linear_logits(weight, bias)(inputs), y, reduction="none")
    approx = finite_difference_gradient_penalty(per_sample, inputs, linear_logits(weight, bias), y, step=1e-3)
    torch.testing.assert_close(approx.double(), expected, rtol=1e-2, atol=0)  # O(h) and float32 rounding
    (approx_grad,) = torch.autograd.grad(approx, weight)
    # what training follows: the same direction, the same size (to O(h))
    assert F.cosine_similarity(approx_grad.flatten(), exact_grad.flatten(), dim=0) > 0.999
    assert float(approx_grad.norm() / exact_grad.norm()) == pytest.approx(1.0, rel=0.02)


def test_explanation_penalty__is_rrr_closed_form():
    weight, bias, x, y = linear_problem(seed=3, classes=3)
    masks = torch.zeros(x.shape[0], 3, 3, dtype=torch.bool)
    masks[:, :2, :2] = True
    inputs = x.clone().requires_grad_(True)
    penalty = explanation_penalty(linear_logits(weight, bias)(inputs), inputs, masks)
    # d sum_k log p_k / d z = 1 - K p, so d / d x = W^T (1 - K p)
    p = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    grad = ((1 - 3 * p) @ weight).view_as(x)
    expected = ((~masks)[:, None].double() * grad.pow(2)).flatten(1).sum(1).mean()
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="masks has shape"):
        explanation_penalty(linear_logits(weight, bias)(inputs), inputs, masks[:, :2])


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_step(model, **settings):
    return SaliencyDecorStep(
        adapt(model, feature_layer="6"), SaliencyDecorArguments(method="baseline", group_size=4, **settings)
    )


def test_adversarial_step__attack_in_eval_mode_then_trains_on_the_perturbed_batch():
    model = bn_model()
    step = make_step(model, adversarial_epsilon=0.3, adversarial_steps=2, adversarial_random_start=False)
    x, y = batch()
    stats = model[1].running_mean.clone()
    # the reference: PGD on the eval-mode model, by the textbook loop of this file's linear case
    model.eval()
    reference = adversarial_perturbation(model, x, y, epsilon=0.3, steps=2, random_start=False)
    model.train()
    perturbed = step._training_inputs(x, y)
    torch.testing.assert_close(perturbed, x + reference)
    assert model.training and torch.equal(model[1].running_mean, stats)  # no statistics from the attack
    assert all(p.grad is None for p in model.parameters())  # and no parameter gradient

    expected_ce = F.cross_entropy(bn_model()(x + reference), y)  # a train-mode forward on x + delta
    output = step.step(model, x, y)
    torch.testing.assert_close(output.loss_ce, expected_ce)


def test_gradient_terms_in_the_step__loss_is_ce_plus_weighted_penalty():
    x, y = batch(1)
    masks = torch.zeros(8, 8, 8)
    masks[:, 2:6, 2:6] = 1
    for settings, name in (
        ({"input_gradient_weight": 0.5}, "loss_input_gradient"),
        ({"explanation_mask_weight": 2.0}, "loss_explanation"),
    ):
        model = bn_model()
        loss, output = make_step(model, **settings).compute_loss(model, x, y, object_masks=masks)
        reference_model = bn_model()
        inputs = x.clone().requires_grad_(True)
        logits = reference_model(inputs)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        if name == "loss_input_gradient":
            penalty = input_gradient_penalty(per_sample.sum(), inputs)
        else:
            penalty = explanation_penalty(logits, inputs, masks)
        weight = next(iter(settings.values()))
        torch.testing.assert_close(loss, per_sample.mean() + weight * penalty)
        torch.testing.assert_close(getattr(output, name), penalty.detach())
        loss.backward()
        assert model[0].weight.grad is not None


def test_explanation_mask_weight__without_masks_is_a_clear_error():
    model = bn_model()
    with pytest.raises(ValueError, match="batch has no 'masks'"):
        make_step(model, explanation_mask_weight=1.0).step(model, *batch())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"adversarial_epsilon": -0.1}, "adversarial_epsilon=-0.1 is negative"),
        ({"adversarial_steps": 0}, "adversarial_steps=0"),
        ({"adversarial_norm": "l1"}, "adversarial_norm='l1' is not supported"),
        ({"adversarial_step_size": 0.0}, "adversarial_step_size=0.0 must be > 0"),
        ({"input_gradient_mode": "hessian"}, "input_gradient_mode='hessian'"),
        ({"input_gradient_step": 0.0}, "input_gradient_step=0.0"),
        ({"input_gradient_weight": 1.0, "whitening_compile": True}, "double back-propagation"),
    ],
)
def test_settings__bad_values_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SaliencyDecorArguments(**settings)


def test_trainer__rrr_on_a_localization_dataset_trains_and_records_its_settings(tmp_path):
    from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
    from sd_plugin.storage.localization_data import LocalizationDataset, write_localization_dataset
    from sd_plugin.storage.model_preprocessing import resize_and_scale

    root = write_localization_dataset(
        tmp_path / "blocks", "digits", counts={"train": 32}, image_size=16, layout="blocks"
    )
    data = LocalizationDataset(root, "train", resize_and_scale(16, 3))
    assert data[0]["masks"].float().mean() == pytest.approx(0.25)  # one cell of the 2 x 2 grid
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    args = SaliencyDecorConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=16, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, method="baseline",
        explanation_mask_weight=1.0, adversarial_epsilon=0.05,
    )  # fmt: skip
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert any("loss_explanation" in entry for entry in trainer.state.log_history)
    trainer.save_model()
    recorded = json.loads((tmp_path / "out" / "saliency_decor.json").read_text())
    assert recorded["explanation_mask_weight"] == 1.0 and recorded["adversarial_epsilon"] == 0.05
    from sd_plugin.hub import export

    card = (export(trainer, tmp_path / "exported") / "README.md").read_text()
    assert "trained on adversarial inputs: linf PGD, epsilon 0.05" in card and "right for the right reasons" in card


def _attention_model(kind, attn_implementation="sdpa"):
    """A tiny attention classifier: transformers ViT / DeiT / Swin (``attn_implementation``) or a timm ViT."""
    torch.manual_seed(0)
    if kind == "timm_vit":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
            num_classes=3,
        )  # fmt: skip
    import transformers

    size = dict(image_size=16, patch_size=8, num_labels=3, attn_implementation=attn_implementation)
    if kind == "swin":
        config = transformers.SwinConfig(
            embed_dim=8, depths=[1], num_heads=[2], window_size=2, patch_size=4, image_size=16, num_labels=3,
            attn_implementation=attn_implementation,
        )  # fmt: skip
        return transformers.SwinForImageClassification(config)
    config_class, model_class = {
        "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
        "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification),
    }[kind]
    config = config_class(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, **size)
    return model_class(config)


TERMS = {
    "gradient norm (double backprop)": dict(input_gradient_weight=1.0),
    "gradient norm (finite difference)": dict(input_gradient_weight=1.0, input_gradient_mode="finite_difference"),
    "RRR": dict(explanation_mask_weight=1.0),
    "adversarial": dict(adversarial_epsilon=0.05),
}


@pytest.mark.parametrize("kind", ["vit", "deit", "swin", "timm_vit"])
@pytest.mark.parametrize("term", list(TERMS))
def test_input_gradient_terms__train_attention_models_with_the_fused_attention_kernel(kind, term):
    """Every input-gradient term runs a step on ViT / DeiT / Swin / timm ViT with their default (SDPA) attention.

    The fused SDPA kernels have no double backward; the package runs those passes by the math backend.
    The step's parameter gradients equal those of the same model with eager attention.
    """
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 16, 16)
    masks[:, 4:12, 4:12] = 1
    gradients = []
    for attention in ("sdpa", "eager") if kind != "timm_vit" else ("sdpa",):
        model = _attention_model(kind, attention)
        step = SaliencyDecorStep(adapt(model), SaliencyDecorArguments(method="baseline", group_size=4, **TERMS[term]))
        output = step.step(model, x, y, object_masks=masks)
        assert torch.isfinite(output.loss)
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0]
    if len(gradients) == 2:
        for name, grad in gradients[0].items():
            # float32 round-off differs between kernels (the finite difference divides it by its step)
            assert (grad - gradients[1][name]).norm() <= 1e-3 * gradients[1][name].norm() + 1e-6, name
