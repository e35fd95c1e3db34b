import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from fake_hub import FakeHub

from sd_plugin import SaliencyDecorTrainer
from sd_plugin.hub import PushError, export, push, validate_repo_id

ROOT = Path(__file__).resolve().parents[1]

# One process for every exported folder the tests load (importing torch + transformers costs seconds):
# it reads ``kind folder inputs out`` lines and answers ``ok`` or the error, without sd_plugin imported.
LOAD_WORKER = """
import sys, traceback, torch
for line in sys.stdin:
    kind, folder, inputs, out = line.rstrip("\\n").split("\\t")
    try:
        x = torch.load(inputs)
        if kind == "timm":
            import timm
            model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
            logits = model(x)
        else:
            from transformers import AutoModelForImageClassification
            model = AutoModelForImageClassification.from_pretrained(folder).eval()
            logits = model(pixel_values=x).logits
        assert "sd_plugin" not in sys.modules, "the exported folder must load without sd_plugin"
        torch.save(logits.detach(), out)
        print("RESULT ok", flush=True)
    except Exception:
        print("RESULT " + traceback.format_exc().replace("\\n", " | "), flush=True)
"""


@pytest.fixture(scope="module")
def fresh_loader(tmp_path_factory):
    """``load(kind, folder, x, tmp_path) -> logits`` in one fresh Python process without sd_plugin."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    cwd = tmp_path_factory.mktemp("fresh")
    worker = subprocess.Popen(
        [sys.executable, "-c", LOAD_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
    )

    def load(kind, folder, x, tmp_path):
        torch.save(x, tmp_path / "x.pt")
        worker.stdin.write("\t".join([kind, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")]) + "\n")
        worker.stdin.flush()
        answer = ""
        while not answer.startswith("RESULT "):  # lines a library printed come first
            answer = worker.stdout.readline()
            assert answer, f"the loader process exited ({worker.poll()})"
        assert answer.strip() == "RESULT ok", answer
        return torch.load(tmp_path / "out.pt")

    yield load
    worker.stdin.close()
    worker.wait(timeout=60)


def train(family, tmp_path, method="saliencydecor", steps=3, whiten_head_input=None):
    model = tiny_models.build(family, tmp_path)
    if family in ("timm_vit",):
        model.sd_plugin_model_args = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    # whiten_head_input None: the paper's rule, CNN heads read whitened features (folded on export)
    return tiny_models.train(
        model,
        tmp_path / "run",
        steps=steps,
        samples=48,
        method=method,
        learning_rate=1e-2,
        whiten_head_input=whiten_head_input,
    )


@pytest.mark.parametrize(
    ("family", "method", "folded"),
    [
        ("timm_resnet", "saliencydecor", True),
        ("timm_vit", "saliencydecor", False),
        ("hf_resnet", "saliencydecor", True),
        ("hf_vit", "saliencydecor", False),
        ("hf_resnet", "sgt", False),
        ("peft_hf_vit", "saliencydecor", False),
        ("peft_timm_resnet", "saliencydecor", True),
        ("hf_timm_wrapper", "saliencydecor", True),
    ],
)
def test_export__fresh_process_without_sd_plugin_reproduces_logits(tmp_path, fresh_loader, family, method, folded):
    trainer = train(family, tmp_path, method)
    model = trainer.model.eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.sd_adapter.logits(model, x)
    folder = export(trainer, tmp_path / "exported")
    metadata = json.loads((folder / "saliency_decor.json").read_text())
    assert metadata["whitening_folded_into_head"] is folded
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))
    from safetensors.torch import load_file

    assert not any("saliency_decor" in key for key in load_file(folder / "model.safetensors"))
    kind = "timm" if family in ("timm_resnet", "timm_vit", "peft_timm_resnet") else "transformers"
    logits = fresh_loader(kind, folder, x, tmp_path)
    # float32 logits through a folded float64 whitening: equal to 1e-4.
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    card = (folder / "README.md").read_text()
    assert "library_name: " + ("timm" if kind == "timm" else "transformers") in card


def test_export__keep_adapter_saves_a_peft_adapter(tmp_path):
    trainer = train("peft_hf_vit", tmp_path)
    folder = export(trainer, tmp_path / "adapter", merge_adapter=False)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "README.md").is_file()


def test_export__from_trainer_output_folder(tmp_path, fresh_loader):
    trainer = train("hf_resnet", tmp_path)
    trainer.save_model()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = trainer.sd_adapter.logits(trainer.model.eval(), x)
    folder = export(tmp_path / "run", tmp_path / "exported")
    logits = fresh_loader("transformers", folder, x, tmp_path)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["timm_resnet", "hf_resnet", "peft_hf_vit"])
def test_save_model__whitened_head_folder_loads_as_the_trained_model_with_plain_libraries(
    tmp_path, fresh_loader, family
):
    # (PEFT on a BatchNorm model cannot be compared: an adapter folder never holds the base's BN statistics.)
    trainer = train(family, tmp_path, whiten_head_input=True)
    assert trainer.sd_adapter.whitening.feeds_head
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trainer.sd_adapter.logits(trainer.model.eval(), x)
    trainer.save_model()
    folder = tmp_path / "run"
    assert json.loads((folder / "saliency_decor.json").read_text())["whitening_folded_into_head"] is True
    if family == "peft_hf_vit":
        from peft import PeftModel
        from transformers import AutoModelForImageClassification

        base = AutoModelForImageClassification.from_pretrained(tmp_path / family)
        with torch.no_grad():
            logits = PeftModel.from_pretrained(base, str(folder)).eval()(pixel_values=x).logits
    else:
        from safetensors.torch import load_file

        assert not any("saliency_decor" in key for key in load_file(folder / "model.safetensors"))
        logits = fresh_loader("timm" if family == "timm_resnet" else "transformers", folder, x, tmp_path)
        from sd_plugin.storage.loading import load_classifier

        with torch.no_grad():
            packaged = trainer.sd_adapter.logits(load_classifier(folder), x)
        torch.testing.assert_close(packaged, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_card__with_evaluation_results_and_figures_parses_back(tmp_path):
    from huggingface_hub import ModelCard

    from sd_plugin.__main__ import main as cli

    trainer = train("hf_resnet", tmp_path)
    trainer.save_model()
    baseline = train("hf_resnet", tmp_path / "b", method="baseline")
    baseline.save_model()
    # Evaluate on a saved image folder of the right size.
    from PIL import Image

    images = tmp_path / "images"
    for label in ("a", "b", "c"):
        (images / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(images / label / f"{i}.png")
    assert (
        cli(
            [
                "evaluate",
                "--model",
                str(tmp_path / "run"),
                "--compare",
                str(tmp_path / "b" / "run"),
                "--dataset",
                str(images),
                "--output-dir",
                str(tmp_path / "eval"),
                "--step",
                "25",
                "--no-progress",
            ]
        )
        == 0
    )
    folder = export(
        tmp_path / "run",
        tmp_path / "exported",
        evaluation=tmp_path / "eval" / "results.json",
        base_model="microsoft/resnet-18",
        training_command="python train.py --method saliencydecor",
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert {"saliencydecor", "interpretability"} <= set(card.data.tags)
    assert card.data.base_model == "microsoft/resnet-18"
    metric_types = {result.metric_type for result in card.data.eval_results}
    assert {"accuracy", "masking_auc", "faithfulness_gap"} <= metric_types
    assert (folder / "figures" / "saliency.png").is_file()
    assert "![figures/saliency.png](figures/saliency.png)" in card.text
    assert "python -m sd_plugin evaluate" in card.text and "python train.py" in card.text
    assert "b/run" in card.text  # the baseline column
    # Issue 11, item 10: the same results attached to another model's folder are refused.
    with pytest.raises(ValueError, match="has other weights than"):
        export(tmp_path / "b" / "run", tmp_path / "wrong", evaluation=tmp_path / "eval" / "results.json")
    assert not (tmp_path / "wrong").exists()


def test_card__without_evaluation_parses_back(tmp_path):
    from huggingface_hub import ModelCard

    folder = export(train("timm_resnet", tmp_path).model, tmp_path / "exported")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm"
    assert card.data.eval_results is None
    assert "Not evaluated yet" in card.text


def run_against(hub: FakeHub, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` online against the loopback Hub with a token."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONPATH")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_push__through_huggingface_hub_to_a_loopback_endpoint(tmp_path):
    folder = export(train("hf_resnet", tmp_path).model, tmp_path / "exported")
    with FakeHub() as hub:
        result = run_against(
            hub, ["-m", "sd_plugin", "push", str(folder), "--repo-id", "alice/resnet-sd", "--private", "--create-pr"]
        )
    assert result.returncode == 0, result.stderr[-3000:] + str(hub.unknown)
    assert "discussions/1" in result.stdout
    assert hub.repos[0]["name"] == "resnet-sd" and hub.repos[0]["organization"] == "alice"
    assert hub.repos[0].get("visibility") == "private" or hub.repos[0].get("private") is True
    assert hub.repos[0]["authorization"] == "Bearer hf_test_token"
    (commit,) = hub.commits
    assert "refs%2Fpr%2F1" in commit["path"] and hub.pull_requests  # --create-pr: committed to a PR
    assert commit["header"]["summary"] == "Upload SaliencyDecor model"
    assert {"README.md", "config.json", "model.safetensors", "saliency_decor.json"} <= set(commit["files"])
    (metadata,) = hub.validated  # the card's YAML went through the Hub's validation endpoint
    assert metadata["library_name"] == "transformers" and "saliencydecor" in metadata["tags"]
    card = commit["files"]["README.md"].decode()
    assert "library_name: transformers" in card and "alice/resnet-sd" in card and "<repo_id>" not in card


PUSH_FROM_TRAINER = """
import sys, torch, timm
from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 3} for i in range(32)]
args = SaliencyDecorConfig(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=16, group_size=8,
                           report_to="none", use_cpu=True, save_strategy="no", push_to_hub=True,
                           hub_model_id="alice/timm-sd", disable_tqdm=True)
trainer = SaliencyDecorTrainer(model=model, args=args, train_dataset=data)
trainer.train()
print("URL", trainer.push_to_hub())
"""


def test_trainer_push_to_hub__timm_model_goes_through_push(tmp_path):
    with FakeHub() as hub:
        result = run_against(hub, ["-c", PUSH_FROM_TRAINER, str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-3000:] + str(hub.unknown)
    assert "URL http://" in result.stdout
    (commit,) = hub.commits
    assert {"README.md", "config.json", "model.safetensors"} <= set(commit["files"])
    assert hub.validated[0]["library_name"] == "timm"
    config = json.loads(commit["files"]["config.json"])
    assert config["architecture"] == "resnet10t"


def test_push__missing_token_keeps_folder(tmp_path, monkeypatch):
    folder = export(train("hf_resnet", tmp_path).model, tmp_path / "exported")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(PushError, match="no Hugging Face token"):
        push(folder, "alice/model")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_bad_input__repo_id_overwrite_untrained_and_partial_folders(tmp_path):
    with pytest.raises(ValueError, match="must look like 'user-or-org/model-name'"):
        validate_repo_id("no-slash")
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        validate_repo_id("alice/bad name!")
    # Untrained whitening that feeds the head.
    from sd_plugin import adapt

    model = tiny_models.build("timm_resnet", tmp_path)
    adapt(model).attach_whitening(group_size=8, whiten_head_input=True)
    with pytest.raises(ValueError, match="never estimated"):
        export(model, tmp_path / "untrained")
    assert not (tmp_path / "untrained").exists()
    # Existing non-empty folder.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(tiny_models.build("hf_resnet", tmp_path), tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    # A failure while writing leaves neither the target nor a staging folder.
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses shared tensors
        export(tied, tmp_path / "tied")
    assert not (tmp_path / "tied").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tied.")]


def test_push__unreachable_hub_one_line_error_and_the_folder_byte_for_byte(tmp_path, monkeypatch):
    """Issue 11, item 7: no traceback from the HTTP client, and the card is not rewritten locally."""
    import socket

    folder = export(train("hf_resnet", tmp_path).model, tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with socket.socket() as probe:  # a local port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONPATH")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN="hf_test_token", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    result = subprocess.run(
        [sys.executable, "-m", "sd_plugin", "push", str(folder), "--repo-id", "alice/first"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "could not push" in result.stderr and "alice/first" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_export__folded_whitening_loads_with_the_package_loader_and_same_logits(tmp_path):
    """Issue 11, item 4: an export whose whitening was folded into the head loads with ``load_classifier``
    (what ``python -m sd_plugin evaluate`` uses) instead of asking for the whitening file."""
    from sd_plugin.storage.loading import load_classifier

    trainer = train("hf_resnet", tmp_path)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trainer.sd_adapter.logits(trainer.model.eval(), x)
    folder = export(trainer, tmp_path / "exported")
    assert json.loads((folder / "saliency_decor.json").read_text())["whiten_head_input"] is True
    model = load_classifier(folder)
    assert not hasattr(model, "saliency_decor_whitening")  # folded: nothing to re-attach
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "said", "not_said"),
    [
        ("sgt", "saliency-guided training", "decorrelation"),
        ("baseline", "plain cross-entropy", "masked"),
        ("saliencydecor", "decorrelation term", "plain cross-entropy"),
    ],
)
def test_card__describes_the_method_the_model_was_trained_with(method, said, not_said):
    from sd_plugin.hub.card import render_model_card

    card = render_model_card("m", "timm", {"method": method, "whiten_head_input": False})
    method_section = card.split("## Method")[1].split("##")[0]
    assert said in method_section and not_said not in method_section
    assert f"(`method={method}`)" in card


def test_create_model_card__writes_the_saliencydecor_card_with_the_last_evaluation(tmp_path):
    from huggingface_hub import ModelCard

    trainer = train("timm_resnet", tmp_path)
    g = torch.Generator().manual_seed(3)
    held_out = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(12)]
    metrics = trainer.evaluate(eval_dataset=held_out)
    trainer.create_model_card(model_name="tiny-sd", dataset="noise-3")
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.library_name == "timm" and card.data.datasets == ["noise-3"]
    assert "`method=saliencydecor`" in card.text and "| `decor_liveness_weight` |" in card.text
    accuracy = next(r.metric_value for r in card.data.eval_results if r.metric_type == "accuracy")
    assert accuracy == pytest.approx(100.0 * metrics["eval_accuracy"])


def test_trainer_card_and_push__honour_or_refuse_every_argument(tmp_path):
    """Issue 21, item 3: create_model_card / push_to_hub ignored language, license, tags, tasks, dataset_tags,
    dataset_args, blocking and revision."""
    from huggingface_hub import ModelCard

    trainer = train("timm_resnet", tmp_path)
    trainer.create_model_card(
        language="en", license="apache-2.0", tags="my-tag", dataset_tags="user/photos", dataset="Photos"
    )
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert (card.data.language, card.data.license, card.data.datasets) == ("en", "apache-2.0", ["user/photos"])
    assert "my-tag" in card.data.tags and "saliencydecor" in card.data.tags
    with pytest.raises(ValueError, match=r"tasks=\['object-detection'\]"):
        trainer.create_model_card(tasks="object-detection")
    with pytest.raises(ValueError, match=r"dataset_args=\.\.\.\) is not supported"):
        trainer.create_model_card(dataset_args="default")
    trainer.args.hub_model_id = "user/model"
    with pytest.raises(ValueError, match="blocking=False"):
        trainer.push_to_hub(blocking=False)
    with pytest.raises(ValueError, match="revision='dev'"):
        trainer.push_to_hub(revision="dev")
    with pytest.raises(TypeError, match=r"unsupported keyword argument\(s\) \['tasks_list'\]"):
        trainer.push_to_hub(tasks_list=["x"])


def test_trainer_private_hooks__exist_upstream_with_the_signatures_overridden():
    """The Trainer overrides private transformers.Trainer methods: on a transformers release that renames or
    re-signs one, this fails here instead of the override silently never being called."""
    import inspect

    from transformers import Trainer

    private = [
        name
        for name, value in vars(SaliencyDecorTrainer).items()
        if name.startswith("_") and not name.startswith("__") and callable(value) and hasattr(Trainer, name)
    ]
    assert {"_save", "_save_checkpoint", "_load_from_checkpoint", "_remove_unused_columns"} <= set(private)
    for name in private:
        ours, theirs = inspect.signature(getattr(SaliencyDecorTrainer, name)), inspect.signature(getattr(Trainer, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    own = {name for name, value in vars(SaliencyDecorTrainer).items() if callable(value) and name.startswith("_")}
    own -= {"__init__", *private}
    # what remains are the Trainer's own helpers, not hooks: none of them shadows a transformers method
    assert all(not hasattr(Trainer, name) for name in own), own


def test_card__license_and_local_datasets(tmp_path):
    from huggingface_hub import ModelCard

    model = tiny_models.build("timm_resnet", tmp_path)
    local = tmp_path / "my-photos"
    local.mkdir()
    folder = export(model, tmp_path / "licensed", datasets=[str(local), "cifar10"], license="apache-2.0")
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["cifar10"]  # a path is no Hub dataset
    assert "a local dataset (`my-photos`)" in card.text and "License: not stated" not in card.text
    assert "## Limitations" in card.text and "random* masks scores as" in card.text
    unstated = ModelCard.load(export(model, tmp_path / "unstated") / "README.md")
    assert unstated.data.license == "other" and "License: not stated" in unstated.text


def test_card_evaluation_table__names_the_explanation_its_numbers_are_for():
    from sd_plugin.hub.card import _evaluation_table

    table = _evaluation_table(
        {"accuracy": 90.0, "grid_pointing_game": 0.5, "num_images": 5, "attribution": "gradcam"}, {}
    )
    assert "of the explanation `gradcam`" in table and "grid pointing game" in table
