import json

from sd_plugin.__main__ import main as cli
from sd_plugin.demo import format_table
from sd_plugin.storage.data import load_digits_splits


def test_digits__real_data_split():
    train, test = load_digits_splits()
    assert len(train) + len(test) == 1797
    example = train[0]
    assert example["pixel_values"].shape == (1, 16, 16)
    assert 0 <= example["labels"] < 10


def test_demo_cli__writes_models_figures_and_table(tmp_path, capsys):
    import warnings

    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(["demo", "--output-dir", str(out), "--epochs", "1", "--seeds", "0"]) == 0
    own = [str(w.message) for w in caught if "sd_plugin" in w.filename and issubclass(w.category, UserWarning)]
    assert own == []  # the demo runs clean: no warning of the package about its own defaults (issue 22, item 5)
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| saliencydecor |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["baseline", "sgt", "saliencydecor"]
    for row in results["rows"]:
        assert 10.0 < row["accuracy"] <= 100.0  # better than chance after one epoch
        assert 0.0 <= row["masking_auc"] <= 10000.0
        assert (out / row["method"] / "seed0" / "model.safetensors").is_file()
    for name in ("saliency.png", "masking_curves.png", "gradient_boxplot.png"):
        assert (out / name).stat().st_size > 10_000
    assert "| method |" in format_table(results["rows"])


def test_cli__version_and_usage(capsys):
    from sd_plugin import __version__

    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sd-plugin {__version__}"
    assert cli(["--help"]) == 0
    assert "convert-efficientnet-lite0" in capsys.readouterr().out
    assert cli(["no-such-command"]) == 2


def test_cli__evaluate_help_states_every_default(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: 5.0)", "(default: mean)", "(default: gradient)", "(default: 64)", "(default: 0)"):
        assert shown in text, shown


def test_cli__export_help_explains_overwrite(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        cli(["export", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite replace an existing, non-empty OUTPUT folder: everything in it is deleted" in text
