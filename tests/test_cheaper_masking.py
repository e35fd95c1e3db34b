"""Issue 20: the settings below the two-pass cost (masked pass on every k-th step, on a fraction of the batch)
and the step's dead work removed (a whitening that feeds only the loss keeps no running statistics)."""

import copy

import pytest
import tiny_models
import torch

from sd_plugin import SaliencyDecorArguments, SaliencyDecorStep
from sd_plugin.core.adapter import adapt
from sd_plugin.core.whitening import GroupZCA

B = 16


def make_step(model, **fields):
    generator = torch.Generator().manual_seed(0)
    return SaliencyDecorStep(adapt(model, feature_layer="body"), SaliencyDecorArguments(**fields), generator=generator)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 16, generator=g), torch.randint(0, 3, (B,), generator=g)


def batch_sizes(model):
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def test_masked_pass_every__masked_steps_weigh_the_kl_k_times_and_the_others_are_one_pass():
    torch.manual_seed(0)
    model = tiny_models.TinyNet()
    every_second, weighted_twice, baseline = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    step = make_step(every_second, method="sgt", masked_pass_every=2, mask_fill="mean")
    sizes = batch_sizes(every_second)
    outputs = [step.step(every_second, *batch(), step_index=index) for index in range(4)]
    assert [out.loss_kl is not None for out in outputs] == [True, False, True, False]
    assert sizes == [B, B, B, B, B, B]  # two passes, one, two, one
    # a masked step: the gradient of every-step SGT with the KL weighted twice (the same objective on average)
    every_second.zero_grad()
    step.step(every_second, *batch(), step_index=4)
    reference = make_step(weighted_twice, method="sgt", consistency_weight=2.0, mask_fill="mean")
    reference.step(weighted_twice, *batch())
    for (name, p), q in zip(every_second.named_parameters(), weighted_twice.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # a step between: cross-entropy only, the gradient of the baseline
    every_second.zero_grad()
    step.step(every_second, *batch(), step_index=5)
    make_step(baseline, method="baseline").step(baseline, *batch())
    for p, q in zip(every_second.parameters(), baseline.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_masked_pass_every__defaults_to_counting_its_own_batches():
    model = tiny_models.TinyNet()
    step = make_step(model, method="sgt", masked_pass_every=3)
    assert [step.step(model, *batch()).loss_kl is not None for _ in range(6)] == [True, False, False] * 2


def test_masked_fraction__the_masked_pass_sees_the_first_images_only():
    model = tiny_models.TinyNet()
    step = make_step(model, method="sgt", masked_fraction=0.25)
    sizes = batch_sizes(model)
    output = step.step(model, *batch())
    assert sizes == [B, B // 4]
    assert output.loss_kl is not None and torch.isfinite(output.loss_kl)


def test_cheaper_masking_settings__bad_values_name_the_argument():
    with pytest.raises(ValueError, match=r"masked_pass_every=0 must be a whole number >= 1"):
        SaliencyDecorArguments(masked_pass_every=0)
    with pytest.raises(ValueError, match=r"masked_fraction=0.0 must be in \(0, 1\]"):
        SaliencyDecorArguments(masked_fraction=0.0)


def test_loss_only_whitening__is_cholesky_keeps_no_running_statistics_and_runs_outside_the_model():
    model = tiny_models.TinyNet()
    step = make_step(model, group_size=8)
    whitening = model.saliency_decor_whitening
    assert whitening.method == "cholesky" and step.settings()["whitening_method"] == "cholesky"
    forwards = []
    whitening.register_forward_hook(lambda *args: forwards.append(1))
    for _ in range(2):
        assert step.step(model, *batch()).loss_decor is not None
    assert forwards == []  # the model's forward does not whiten: the loss does (GroupZCA.whiten_for_loss)
    assert int(whitening.num_batches_tracked) == 0  # nothing reads running statistics of a loss-only whitening


def test_whitening_that_feeds_the_head__is_zca_and_tracks_running_statistics():
    model = tiny_models.TinyNet()
    step = make_step(model, group_size=8, whiten_head_input=True)
    assert model.saliency_decor_whitening.method == "eigh"
    step.step(model, *batch())
    assert int(model.saliency_decor_whitening.num_batches_tracked) == 2  # clean and masked pass
    with pytest.raises(ValueError, match="whitening_method='cholesky' with whiten_head_input=True"):
        make_step(tiny_models.TinyNet(), group_size=8, whiten_head_input=True, whitening_method="cholesky")


def test_decor_target_features__does_not_whiten(monkeypatch):
    calls = []
    original = GroupZCA.whiten_for_loss
    monkeypatch.setattr(GroupZCA, "whiten_for_loss", lambda self, f: calls.append(1) or original(self, f))
    model = tiny_models.TinyNet()
    make_step(model, group_size=8, decor_target="features").step(model, *batch())
    assert calls == []
    make_step(tiny_models.TinyNet(), group_size=8).step(None, *batch())
    assert calls == [1]
