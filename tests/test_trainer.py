import json
import os

import pytest
import tiny_models
import torch
from compile_support import needs_torch_compile
from transformers import TrainingArguments

from sd_plugin import NonFiniteLossError, SaliencyDecorConfig, SaliencyDecorTrainer, SaliencyDecorWarning

N = 32


def dataset(seed=0, channels=3, n=N, label_key="labels"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, 16, 16, generator=g)
    labels = torch.randint(0, tiny_models.NUM_CLASSES, (n,), generator=g)
    # Class-dependent brightness so the task is learnable.
    images += labels.view(-1, 1, 1, 1).float()
    return [{"pixel_values": images[i], label_key: int(labels[i])} for i in range(n)]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        group_size=8,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return SaliencyDecorConfig(**values)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_trained(trainer, before, method):
    after = snapshot(trainer.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "no parameter changed"
    logged = [entry for entry in trainer.state.log_history if "loss_ce" in entry]
    assert logged, trainer.state.log_history
    expected = {"loss_ce", "live_features"}
    if method in ("sgt", "saliencydecor"):
        expected |= {"loss_kl", "masked_accuracy"}
    if method in ("decor", "saliencydecor"):
        expected |= {"loss_decor"}
    for entry in logged:
        assert expected <= set(entry), entry
        for key in expected:
            assert torch.isfinite(torch.tensor(entry[key])), (key, entry)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_train__each_family_saliencydecor(tmp_path, family):
    model = tiny_models.build(family, tmp_path)
    before = snapshot(model)
    args = config(tmp_path, feature_layer=tiny_models.feature_layer(family))
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(1))
    trainer.train()
    assert_trained(trainer, before, "saliencydecor")
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


@pytest.mark.parametrize("family", ["hf_resnet", "timm_vit"])
@pytest.mark.parametrize("method", ["baseline", "sgt", "decor", "saliencydecor"])
def test_train__all_methods(tmp_path, family, method):
    model = tiny_models.build(family, tmp_path)
    before = snapshot(model)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path, method=method), train_dataset=dataset())
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    trainer.train()
    handle.remove()
    assert_trained(trainer, before, method)
    assert len(calls) == 2 * (2 if method in ("sgt", "saliencydecor") else 1)
    assert hasattr(model, "saliency_decor_whitening") == (method in ("decor", "saliencydecor"))


@needs_torch_compile
def test_train__whitening_compile_same_weights_and_whitening_statistics(tmp_path):
    # "decor": the masks of "saliencydecor" rank pixels by gradient, so round-off can flip a near tie.
    results = []
    for compile_whitening in (False, True):
        model = tiny_models.build("timm_resnet", tmp_path)
        args = config(
            tmp_path,
            method="decor",
            whitening_compile=compile_whitening,
            eval_strategy="steps",
            eval_steps=2,
            optim="sgd",
            learning_rate=0.1,
        )
        trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(1))
        trainer.train()  # evaluates at steps 1 and 2: eval mode between compiled training steps
        results.append((snapshot(model), model.saliency_decor_whitening.running_cov.clone()))
    # SGD: the weight change is proportional to the gradient, so eager-vs-compiled round-off stays round-off.
    # (Under AdamW, g / sqrt(v) turns a 1e-9 gradient difference on a near-zero gradient into a weight
    # difference of the order of the learning rate: one weight of 18,432 off by 3.5e-4 on fresh clones.)
    for name, value in results[0][0].items():
        torch.testing.assert_close(results[1][0][name], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    assert model.saliency_decor_whitening.compiled


def test_evaluate__single_forward_without_grad(tmp_path):
    model = tiny_models.build("timm_resnet", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path), eval_dataset=dataset(1))
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    metrics = trainer.evaluate()
    handle.remove()
    assert calls == [False, False]  # 32 images, batch 16, no input-gradient work
    assert "eval_loss" in metrics


def test_gradient_accumulation__2x_half_batch_equals_1x_full_batch(tmp_path):
    results = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        model = tiny_models.build("hf_vit", tmp_path)
        args = config(
            tmp_path,
            method="baseline",
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            lr_scheduler_type="constant",
            learning_rate=0.5,
            max_grad_norm=0.0,
        )
        trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=dataset(n=16))
        trainer.train()
        results.append((snapshot(model), trainer.state.log_history[0]["loss"]))
    (full, full_loss), (half, half_loss) = results
    for name in full:
        torch.testing.assert_close(half[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert half_loss == pytest.approx(full_loss, rel=1e-4)


@pytest.mark.parametrize("whiten_head_input", [False, True])
def test_resume_from_checkpoint__continues_exactly(tmp_path, whiten_head_input):
    common = dict(
        max_steps=4,
        mask_fill="mean",
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-2,
        whiten_head_input=whiten_head_input,
    )
    model = tiny_models.build("timm_resnet", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path, **common), train_dataset=dataset(n=64))
    trainer.train()
    uninterrupted = snapshot(model)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()  # timm models have no .config: still safetensors
    from safetensors.torch import load_file

    # The weight file is the plain model (timm loads it); the whitening state is beside it.
    assert not any("saliency_decor" in key for key in load_file(checkpoint / "model.safetensors"))
    training_state = load_file(checkpoint / "saliency_decor_whitening.safetensors")
    assert "whitening.running_cov" in training_state
    assert ("unfolded_head.weight" in training_state) is whiten_head_input

    resumed_model = tiny_models.build("timm_resnet", tmp_path, seed=1)
    args = config(tmp_path, **{**common, "output_dir": str(tmp_path / "resumed")})
    resumed = SaliencyDecorTrainer(model=resumed_model, args=args, train_dataset=dataset(n=64))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in snapshot(resumed_model).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(
        resumed_model.saliency_decor_whitening.running_cov, model.saliency_decor_whitening.running_cov
    )


@pytest.mark.parametrize("family", ["hf_vit", "hf_convnext"])
def test_resume_from_checkpoint__transformers_model_continues_exactly(tmp_path, family):
    """Train 4 steps; a fresh model resumed from the step-2 checkpoint ends with the same weights.

    transformers 5 saves legacy key names (ViT's ``vit.encoder.layer.0.attention.attention.key``)
    that a plain ``load_state_dict`` of ``Trainer._load_from_checkpoint`` does not map: resuming
    must load them the way ``from_pretrained`` does, not train on from freshly initialised layers.
    """
    common = dict(max_steps=4, mask_fill="mean", save_strategy="steps", save_steps=2, learning_rate=1e-2)
    model = tiny_models.build(family, tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path, **common), train_dataset=dataset(n=64))
    trainer.train()
    uninterrupted = snapshot(model)
    uninterrupted_losses = [e["loss_ce"] for e in trainer.state.log_history if "loss_ce" in e]

    resumed_model = tiny_models.build(family, tmp_path, seed=1)
    args = config(tmp_path, **{**common, "output_dir": str(tmp_path / "resumed")})
    resumed = SaliencyDecorTrainer(model=resumed_model, args=args, train_dataset=dataset(n=64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    resumed_losses = [e["loss_ce"] for e in resumed.state.log_history if "loss_ce" in e]
    assert resumed_losses[-2:] == pytest.approx(uninterrupted_losses[-2:], rel=1e-4)  # steps 3 and 4
    for name, value in snapshot(resumed_model).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-4, atol=1e-6, msg=name)


def test_resume_from_checkpoint__weights_that_do_not_load_are_refused(tmp_path):
    """A checkpoint whose weights do not fit the model is an error, not training from fresh layers."""
    common = dict(max_steps=2, mask_fill="mean", save_strategy="steps", save_steps=2)
    trainer = SaliencyDecorTrainer(
        model=tiny_models.build("timm_vit", tmp_path), args=config(tmp_path, **common), train_dataset=dataset(n=64)
    )
    trainer.train()
    other = tiny_models.build("timm_resnet", tmp_path)
    args = config(tmp_path, **{**common, "max_steps": 4, "output_dir": str(tmp_path / "resumed")})
    resumed = SaliencyDecorTrainer(model=other, args=args, train_dataset=dataset(n=64))
    with pytest.raises(ValueError, match="do not load into the model.*freshly initialised"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_load_best_model_at_end__whitened_head_is_the_best_checkpoint(tmp_path):
    import timm

    args = config(
        tmp_path,
        max_steps=4,
        whiten_head_input=True,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    model = tiny_models.build("timm_resnet", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=dataset(n=64), eval_dataset=dataset(1))
    trainer.train()
    best = timm.create_model(f"local-dir:{trainer.state.best_model_checkpoint}", pretrained=True).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), best(x), rtol=1e-4, atol=1e-4)


def test_resume_from_checkpoint__peft_restores_whitening_statistics(tmp_path):
    common = dict(max_steps=2, mask_fill="mean", save_strategy="steps", save_steps=2)
    model = tiny_models.build("peft_timm_resnet", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path, **common), train_dataset=dataset(n=64))
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "saliency_decor_whitening.safetensors").is_file()
    trained_cov = model.get_base_model().saliency_decor_whitening.running_cov.clone()

    fresh = tiny_models.build("peft_timm_resnet", tmp_path)
    args = config(tmp_path, **{**common, "output_dir": str(tmp_path / "resumed"), "max_steps": 2})
    resumed = SaliencyDecorTrainer(model=fresh, args=args, train_dataset=dataset(n=64))
    resumed._load_from_checkpoint(str(checkpoint))
    torch.testing.assert_close(fresh.get_base_model().saliency_decor_whitening.running_cov, trained_cov)


def test_bf16__trains_finite(tmp_path):
    model = tiny_models.build("hf_resnet", tmp_path)
    before = snapshot(model)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path, bf16=True), train_dataset=dataset())
    trainer.train()
    assert_trained(trainer, before, "saliencydecor")


def test_loggers__callbacks_receive_components(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):  # what report_to integrations see: on_log(logs)
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    model = tiny_models.build("timm_resnet", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path), train_dataset=dataset(), callbacks=[recorder])
    trainer.train()
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 2
    assert {"loss_ce", "loss_kl", "loss_decor", "masked_accuracy"} <= set(step_logs[0])
    assert 0.0 <= step_logs[0]["masked_accuracy"] <= 1.0


def test_plain_training_arguments__get_method_defaults(tmp_path):
    model = tiny_models.build("timm_resnet", tmp_path)
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True, per_device_train_batch_size=16
    )
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=dataset())
    assert isinstance(trainer.args, SaliencyDecorConfig)
    assert trainer.args.method == "saliencydecor" and trainer.args.max_steps == 1
    with pytest.warns(SaliencyDecorWarning, match="smaller than 2 x group_size"):  # the default group of 16
        trainer.train()
    assert trainer.state.global_step == 1


def test_bad_input__batch_without_labels(tmp_path):
    model = tiny_models.build("timm_resnet", tmp_path)
    data = [{"pixel_values": row["pixel_values"]} for row in dataset()]
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="no labels"):
        trainer.train()


def test_bad_input__channel_mismatch(tmp_path):
    model = tiny_models.build("hf_vit", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path), train_dataset=dataset(channels=1))
    with pytest.raises(ValueError, match="1 channels but the model expects 3"):
        trainer.train()


def test_bad_input__nan_stops_training_without_checkpoint(tmp_path):
    model = tiny_models.build("timm_resnet", tmp_path)
    data = dataset()
    for row in data:
        row["pixel_values"] = row["pixel_values"] * float("inf")
    args = config(tmp_path, save_strategy="steps", save_steps=1)
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=data)
    with pytest.raises(NonFiniteLossError, match="NaN|non-finite"):
        trainer.train()
    output = tmp_path / "out"
    assert not output.exists() or not any(name.startswith("checkpoint") for name in os.listdir(output))


def test_bad_input__unknown_head(tmp_path):
    model = tiny_models.build("custom", tmp_path)
    with pytest.raises(ValueError, match="feature_layer="):
        SaliencyDecorTrainer(model=model, args=config(tmp_path), train_dataset=dataset())


def test_label_column_named_label(tmp_path):
    model = tiny_models.build("timm_resnet", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path), train_dataset=dataset(label_key="label"))
    trainer.train()
    assert trainer.state.global_step == 2


def test_log_history_is_json_serialisable(tmp_path):
    model = tiny_models.build("timm_vit", tmp_path)
    trainer = SaliencyDecorTrainer(model=model, args=config(tmp_path), train_dataset=dataset())
    trainer.train()
    json.dumps(trainer.state.log_history)


@pytest.mark.parametrize("whiten_head_input", [False, True])
def test_train__last_batch_of_one_sample_trains_with_one_warning(tmp_path, whiten_head_input):
    """33 images at batch 16: the last batch holds one image (issue 11, item 2)."""
    model = tiny_models.build("hf_resnet", tmp_path)
    args = config(tmp_path, max_steps=-1, num_train_epochs=2, whiten_head_input=whiten_head_input)
    trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=dataset(n=33))
    with pytest.warns(UserWarning, match="batch of 1 sample") as caught:
        trainer.train()
    assert sum("batch of 1 sample" in str(w.message) for w in caught) == 1  # once, though two epochs end so
    whitening = model.saliency_decor_whitening
    assert whitening.training and torch.isfinite(whitening.running_cov).all()
    assert trainer.state.global_step == 6


def test_report_to_tensorboard__after_the_tracking_extra_logs_the_loss_components(tmp_path):
    """``pip install 'sd-plugin[tracking]'`` makes ``report_to=["tensorboard"]`` work; the extra losses reach it."""
    pytest.importorskip("tensorboard", reason="pip install 'sd-plugin[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_models.train(
        tiny_models.build("timm_resnet", tmp_path), tmp_path / "run", steps=2, report_to=["tensorboard"],
        logging_steps=1,
    )  # fmt: skip
    events = [path.parent for path in (tmp_path / "run").rglob("events.out.tfevents.*")]
    assert events, list((tmp_path / "run").rglob("*"))
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kl", "train/loss_decor"} <= tags, tags


def test_readme__the_trainer_swap_runs_as_the_diff_writes_it(tmp_path, monkeypatch):
    """The README's diff, its ``+`` side applied: a transformers classifier trains with SaliencyDecor."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    diff = readme.split("<!-- trainer-swap -->")[1].split("<!-- /trainer-swap -->")[0].split("```diff\n")[1]
    code = "\n".join(line[1:] for line in diff.split("```")[0].splitlines() if not line.startswith("-"))
    model = tiny_models.build("hf_resnet", tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    train = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(64)]
    before = model.classifier[-1].weight.detach().clone()
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "train": train, "val": train[:16]}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.args.method == "saliencydecor" and trainer.state.global_step == 3
    assert not torch.equal(model.classifier[-1].weight, before)
