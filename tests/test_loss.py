import pytest
import tiny_models
import torch
import torch.nn.functional as F
from compile_support import needs_torch_compile

from sd_plugin import NonFiniteLossError, SaliencyDecorArguments, SaliencyDecorStep, decorrelation_loss
from sd_plugin.core.adapter import adapt
from sd_plugin.core.masking import lowest_saliency_mask, pixel_saliency

B = 16


def make_step(adapter, generator=None, **fields):
    return SaliencyDecorStep(adapter, SaliencyDecorArguments(**fields), generator=generator)


def batch(seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, channels, 16, 16, generator=g), torch.randint(0, 3, (B,), generator=g)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(("method", "passes"), [("baseline", 1), ("decor", 1), ("sgt", 2), ("saliencydecor", 2)])
def test_step__forward_passes_and_components(method, passes):
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    loss = make_step(adapt(model, feature_layer="body"), method=method, group_size=8)
    calls, handle = count_forwards(model)
    out = loss.step(model, *batch())
    handle.remove()
    assert len(calls) == passes
    expected = {"loss", "loss_ce", "live_features"}
    if method in ("sgt", "saliencydecor"):
        expected |= {"loss_kl", "masked_accuracy"}
    if method in ("decor", "saliencydecor"):
        expected |= {"loss_decor"}
    assert set(out.components()) == expected
    assert all(torch.isfinite(v) for v in out.components().values())
    assert all(p.grad is not None for p in model.parameters())


def reference_gradients(
    model, x, y, consistency_grad, decor_weight=0.01, beta=1.0, ratio=0.25, saliency_target="objective"
):
    """Naive SaliencyDecor gradients from the paper's objective, written out by hand."""
    params = [p for p in model.parameters()]
    whitening = model.saliency_decor_whitening
    x = x.clone().requires_grad_(True)
    f = model.body(x)
    z = whitening(f)
    logits = model.out(torch.relu(model.embed(z)))  # feature_layer="body" whitens body's output
    ce = F.cross_entropy(logits, y)
    clean = ce + decor_weight * decorrelation_loss(z)
    saliency_of = {"objective": clean, "loss": ce, "logit": logits.gather(1, y.view(-1, 1)).sum()}[saliency_target]
    input_grad = torch.autograd.grad(saliency_of, x, retain_graph=True)[0]
    mask = lowest_saliency_mask(pixel_saliency(input_grad), ratio)
    masked_x = torch.where(mask.unsqueeze(1), x.detach().mean((2, 3), keepdim=True), x.detach())
    masked_logits = model.out(torch.relu(model.embed(whitening(model.body(masked_x)))))
    target = logits.detach() if consistency_grad == "detached" else logits
    kl = F.kl_div(masked_logits.log_softmax(-1), target.log_softmax(-1), reduction="batchmean", log_target=True)
    return dict(
        zip([n for n, _ in model.named_parameters()], torch.autograd.grad(clean + beta * kl, params), strict=True)
    )


@pytest.mark.parametrize("saliency_target", ["objective", "loss", "logit"])
@pytest.mark.parametrize("consistency_grad", ["detached", "both"])
def test_step__gradients_equal_hand_written_objective(consistency_grad, saliency_target):
    torch.manual_seed(0)
    model = tiny_models.TinyNet().double()
    loss = make_step(
        adapt(model, feature_layer="body"),
        mask_fill="mean",
        group_size=8,
        consistency_grad=consistency_grad,
        whiten_head_input=True,
        decor_weight=0.01,
        saliency_target=saliency_target,
    )
    model.saliency_decor_whitening.double()
    x, y = batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss.step(model, x.double(), y)
    ours = grads(model)
    model.load_state_dict(state)
    model.zero_grad()
    loss.adapter.remove()
    reference = reference_gradients(model, x.double(), y, consistency_grad, saliency_target=saliency_target)
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-7, msg=name)  # a wrong mask: 5-20% off


def test_step__saliency_targets_mask_different_pixels():
    """Each ``saliency_target`` ranks the pixels by its own gradient (so the masked pass differs)."""
    masks = {}
    for target in ("objective", "loss", "logit"):
        torch.manual_seed(0)
        model = tiny_models.TinyNet().double()
        loss = make_step(
            adapt(model, feature_layer="body"), mask_fill="zero", group_size=8, decor_weight=1.0, saliency_target=target
        )
        seen = []
        handle = model.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(args[0].detach().clone()))
        x, y = batch()
        loss.step(model, x.double(), y)
        handle.remove()
        masks[target] = seen[1] == 0  # the masked pass's input: zero where masked
    assert not torch.equal(masks["objective"], masks["loss"])
    assert not torch.equal(masks["loss"], masks["logit"])


def test_step__consistency_grad_both_differs_from_detached():
    results = []
    for mode in ("detached", "both"):
        torch.manual_seed(0)
        model = tiny_models.TinyNet()
        make_step(adapt(model, feature_layer="body"), method="sgt", mask_fill="mean", consistency_grad=mode).step(
            model, *batch()
        )
        results.append(model.body[0].weight.grad.clone())
    assert not torch.allclose(*results)


@pytest.mark.parametrize("updates", [True, False])
def test_step__masked_pass_running_statistics(updates):
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    loss = make_step(
        adapt(model, feature_layer="body"),
        masked_pass_updates_stats=updates,
        group_size=8,
        mask_fill="zero",
        whiten_head_input=True,  # the whitening runs in the masked pass too
    )
    x, y = batch()
    bn = model.body[1]
    loss.step(model, x, y)
    after_step = (
        bn.running_mean.clone(),
        int(bn.num_batches_tracked),
        model.saliency_decor_whitening.num_batches_tracked,
    )
    assert after_step[1] == (2 if updates else 1)
    assert int(after_step[2]) == (2 if updates else 1)


def test_step__ga_loss_scale_scales_gradients():
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    adapter = adapt(model, feature_layer="body")
    loss = make_step(adapter, method="baseline")
    x, y = batch()
    loss.step(model, x, y)
    full = grads(model)
    model.zero_grad()
    loss.step(model, x, y, loss_scale=0.5)
    for name, value in grads(model).items():
        torch.testing.assert_close(value, 0.5 * full[name])


def test_step__nan_is_recorded_on_the_device_and_raised_when_checked():
    model = tiny_models.TinyNet()
    step = make_step(adapt(model, feature_layer="body"), group_size=8)
    x, y = batch()
    step.step(model, x, y)
    step.raise_if_nonfinite(step=1)  # finite: returns, and step 1 is the last clean check
    x[0, 0, 0, 0] = float("nan")
    step.step(model, x, y)  # recorded, not read: the step does not wait for the device
    expected = (
        r"non-finite loss components loss_ce \(first at training batch 2\), loss_decor \(first at training batch 2\), "
        r"loss_kl \(first at training batch 2\), between step 1 and step 2: training stopped; no checkpoint was "
        r"written after step 1\. Lower the learning rate or check the inputs for NaN, or raise whitening_shrinkage\."
    )
    with pytest.raises(NonFiniteLossError, match=expected):
        step.raise_if_nonfinite(step=2)
    sgt = make_step(adapt(tiny_models.TinyNet(), feature_layer="body"), method="sgt")
    with pytest.raises(NonFiniteLossError, match="loss_ce") as caught:
        sgt.compute_loss(None, x, y)  # raises before the caller's backward
    assert "shrinkage" not in str(caught.value)  # sgt has no whitening to advise on (issue 11, item 12)
    unchecked = make_step(adapt(tiny_models.TinyNet(), feature_layer="body"), method="sgt", check_finite=False)
    unchecked.step(None, x, y)
    unchecked.raise_if_nonfinite(step=1)  # check_finite=False: nothing recorded, nothing raised


def test_step__bf16_autocast_finite():
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    loss = make_step(adapt(model, feature_layer="body"), group_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss.step(model, *batch())
    assert all(torch.isfinite(v) for v in out.components().values())
    assert model.saliency_decor_whitening.running_cov.dtype == torch.float32


def test_init__errors_name_the_argument():
    model = tiny_models.TinyNet()
    adapter = adapt(model, feature_layer="body")
    with pytest.raises(ValueError, match=r"method='dbn' is not supported; allowed values are \('baseline'"):
        make_step(adapter, method="dbn")
    with pytest.raises(ValueError, match=r"mask_ratio=1.0 is out of range; use a fraction in \[0, 1\)"):
        make_step(adapter, mask_ratio=1.0)
    with pytest.raises(ValueError, match="decor_weight=-1.0 is negative; use a weight >= 0"):
        make_step(adapter, decor_weight=-1.0)
    with pytest.raises(ValueError, match="group_size=5 does not divide num_features=16"):
        make_step(adapter, group_size=5)
    with pytest.raises(ValueError, match=r"saliency_target='gradcam' is not supported; allowed values are \('obj"):
        make_step(adapter, saliency_target="gradcam")


def test_step__error_channel_mismatch():
    model = tiny_models.TinyNet()
    loss = make_step(adapt(model, feature_layer="body"), group_size=8)
    with pytest.raises(ValueError, match="1 channels but the model expects 3"):
        loss.step(model, *batch(channels=1))


@needs_torch_compile
@pytest.mark.parametrize("method", ["decor", "saliencydecor"])
def test_step__whitening_compile_same_gradients_as_eager(method):
    # mask_ratio=0: both passes and their backwards run, but no pixel ranking, which round-off
    # differences in the input gradient could flip at a near tie.
    results = []
    for compile_whitening in (False, True):
        torch.manual_seed(0)
        model = tiny_models.TinyNet()
        loss = make_step(
            adapt(model, feature_layer="body"),
            method=method,
            group_size=8,
            mask_selection="random",  # masks that no gradient round-off can change
            whitening_compile=compile_whitening,
            generator=torch.Generator().manual_seed(1),
        )
        out = loss.step(model, *batch())
        results.append((out.loss, grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=1e-4, atol=1e-6)


def test_init__whitening_compile_refuses_consistency_grad_both():
    # "both" back-propagates the clean pass twice (retain_graph); compiled backwards gave wrong
    # gradients there on one machine, so the combination is refused before any step.
    with pytest.raises(ValueError, match="whitening_compile=True does not support consistency_grad='both'"):
        make_step(adapt(tiny_models.TinyNet(), feature_layer="body"), whitening_compile=True, consistency_grad="both")


def test_init__whitening_compile_refuses_synced_statistics():
    with pytest.raises(ValueError, match="whitening_compile=True does not support sync_whitening"):
        make_step(adapt(tiny_models.TinyNet(), feature_layer="body"), whitening_compile=True, sync_whitening=True)


def test_step__batch_of_one_skips_decorrelation_on_running_statistics():
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    loss = make_step(adapt(model, feature_layer="body"), group_size=8, whiten_head_input=True)
    loss.step(model, *batch())  # a full batch sets the running statistics
    whitening = model.saliency_decor_whitening
    running = {k: v.clone() for k, v in whitening.state_dict().items()}
    x, y = batch(seed=1)
    model.zero_grad()
    with pytest.warns(UserWarning, match="batch of 1 sample"):
        out = loss.step(model, x[:1], y[:1])
    assert out.loss_decor is None and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(torch.equal(running[k], v) for k, v in whitening.state_dict().items())  # not updated by one sample
    assert whitening.training  # restored after the step
    # the head saw the features whitened with the running statistics (eval mode)
    whitening.eval()
    expected = model(x[:1])
    whitening.train()
    torch.testing.assert_close(out.logits, expected.detach())


def test_step__batches_below_twice_the_group_size_warn_once():
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    loss = make_step(adapt(model, feature_layer="body"), group_size=8)
    x, y = batch()
    with pytest.warns(UserWarning, match=r"smaller than 2 x group_size \(16\)") as caught:
        loss.step(model, x[:6], y[:6])
        loss.step(model, x[:6], y[:6])
    assert len([w for w in caught if "group_size" in str(w.message)]) == 1


def test_step__labels_beyond_the_head_are_refused_on_the_first_batch():
    model = tiny_models.TinyNet()
    loss = make_step(adapt(model, feature_layer="body"), method="sgt")
    x, y = batch()
    y[3] = 7  # the head has 3 outputs
    with pytest.raises(ValueError, match=r"labels range over \[0, 7\] but the model's head has 3 outputs"):
        loss.step(model, x, y)


def test_init__a_frozen_head_gets_one_warning():
    """Issue 11, item 12: LoRA without the head in modules_to_save leaves the head untrained."""
    model = tiny_models.TinyNet()
    model.out.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"classification head \(out\) has no trainable parameter"):
        make_step(adapt(model, feature_layer="body"), method="sgt")


@pytest.mark.parametrize(
    ("method", "consistency_grad"),
    [("saliencydecor", "detached"), ("saliencydecor", "both"), ("sgt", "detached"), ("decor", "detached")],
)
def test_compute_loss__backward_gives_the_gradients_of_step(method, consistency_grad):
    """``compute_loss(...)[0].backward()`` (one backward, user's loop) equals ``step`` (its own backwards)."""
    results = []
    for entry in ("step", "compute_loss"):
        torch.manual_seed(0)
        model = tiny_models.TinyNet().double()
        step = make_step(
            adapt(model, feature_layer="body"),
            method=method,
            group_size=8,
            mask_fill="mean",
            consistency_grad=consistency_grad,
            whiten_head_input=True,
        )
        if step.whitening is not None:
            step.whitening.double()
        x, y = batch()
        if entry == "step":
            out = step.step(model, x.double(), y)
        else:
            loss, out = step.compute_loss(model, x.double(), y)
            loss.backward()
            torch.testing.assert_close(loss.detach(), out.loss)
        results.append((out, grads(model)))
    (step_out, step_grads), (loss_out, loss_grads) = results
    assert set(step_out.components()) == set(loss_out.components())
    for name, value in step_out.components().items():
        torch.testing.assert_close(loss_out.components()[name], value, msg=name)
    for name, value in step_grads.items():
        torch.testing.assert_close(loss_grads[name], value, rtol=1e-7, atol=1e-10, msg=name)


def test_readme_any_training_loop_snippet_runs():
    """docs/training.md's "Any training loop" snippet trains a timm model as written."""
    import re
    from pathlib import Path

    import timm

    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = re.search(r"## Any training loop\n\n```python\n(.*?)```", readme, re.S).group(1)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    loader = [{"pixel_values": torch.randn(32, 3, 32, 32), "labels": torch.randint(0, 3, (32,))} for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.fc.weight.detach().clone()
    namespace = {"model": model, "loader": loader, "optimizer": optimizer}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    assert torch.isfinite(namespace["out"].loss) and not torch.equal(model.fc.weight, before)


def test_init__mask_ratio_zero_with_masking_is_refused_and_names_the_fix():
    with pytest.raises(ValueError, match="mask_ratio=0 masks no pixel.*method='baseline' / 'decor'"):
        SaliencyDecorArguments(method="sgt", mask_ratio=0.0)
    assert SaliencyDecorArguments(method="decor", mask_ratio=0.0).mask_ratio == 0.0  # no masking: nothing to refuse


def test_step__non_finite_error_raises_no_scalar_conversion_warning():
    import warnings

    model = tiny_models.TinyNet()
    step = make_step(adapt(model, feature_layer="body"), method="sgt", group_size=8)
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Converting a tensor with requires_grad=True to a scalar"
        step.step(model, x, y)
        with pytest.raises(NonFiniteLossError, match="loss_ce"):
            step.raise_if_nonfinite()


def test_step__process_rules_live_in_the_step():
    """Issue 21: the rule both front-ends need (no 'both' structure across processes) is the step's, not a loop's."""
    adapter = adapt(tiny_models.TinyNet(), feature_layer="body")
    with pytest.raises(ValueError, match=r"consistency_grad='both' .* several processes \(2\)"):
        SaliencyDecorStep(adapter, SaliencyDecorArguments(method="sgt", consistency_grad="both"), num_processes=2)
    SaliencyDecorStep(adapter, SaliencyDecorArguments(method="baseline", consistency_grad="both"), num_processes=2)
