import json

import pytest

from sd_plugin.__main__ import main as cli
from sd_plugin.cli.demo import CONTROL, DEFAULT_RUNS, format_table, reading
from sd_plugin.storage.builtin_datasets import load_digits_splits


def test_digits__real_data_split():
    train, test = load_digits_splits()
    assert len(train) + len(test) == 1797
    example = train[0]
    assert example["pixel_values"].shape == (1, 16, 16)
    assert 0 <= example["labels"] < 10


def test_demo_cli__table_has_the_control_row_and_the_ground_truth_columns(tmp_path, capsys):
    import warnings

    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(["demo", "--output-dir", str(out), "--epochs", "1", "--seeds", "0", "--metric-images", "40"]) == 0
    own = [str(w.message) for w in caught if "sd_plugin" in w.filename and issubclass(w.category, UserWarning)]
    assert own == []  # the demo runs clean: no warning of the package about its own defaults (issue 22, item 5)
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| run |"))
    for column in ("accuracy % ↑", "ROAD LeRF−MoRF ↑", "relevance mass ↑", "pointing game ↑"):
        assert column in header, column
    assert "| random-mask control |" in printed and "| saliencydecor |" in printed
    assert "vs the control" in printed  # the generated reading compares with the control
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == list(DEFAULT_RUNS)
    assert results["rows"][3]["settings"] == {"mask_selection": "random"}
    for row in results["rows"]:
        assert 10.0 < row["accuracy"] <= 100.0  # better than chance after one epoch
        assert 0.0 <= row["relevance_mass"] <= 1.0 and 0.0 <= row["pointing_game"] <= 1.0
        assert (out / row["method"].replace(" ", "-") / "seed0" / "model.safetensors").is_file()
    for name in ("saliency.png", "masking_curves.png", "gradient_boxplot.png"):
        assert (out / name).stat().st_size > 10_000
    assert "| run |" in format_table(results["rows"])
    # a second demo into the same folder is refused before training; --overwrite replaces it
    from sd_plugin.utils.previous_run import PreviousRunError

    with pytest.raises(PreviousRunError, match="--overwrite"):
        cli(["demo", "--output-dir", str(out), "--epochs", "1", "--seeds", "0", "--runs", "baseline"])
    assert json.loads((out / "results.json").read_text()) == results  # untouched


def _row(name, mass, mass_std, road=0.5, accuracy=90.0):
    return {
        "method": name,
        "relevance_mass": mass,
        "relevance_mass_std": mass_std,
        "road_lerf_morf_gap": road,
        "road_lerf_morf_gap_std": 0.01,
        "accuracy": accuracy,
    }


def test_reading__follows_the_numbers():
    rows = [_row("baseline", 0.50, 0.01), _row("sgt", 0.53, 0.01), _row(CONTROL, 0.60, 0.02)]
    text = reading(rows)
    assert text.startswith("No run is beyond one std above both")
    assert "sgt: relevance mass +0.030 vs baseline (beyond 1 std), -0.070 vs the control (beyond 1 std)" in text
    rows[1] = _row("sgt", 0.65, 0.01, accuracy=88.5)
    verdict = "Beyond one std above both the baseline and the control on relevance mass: sgt (-1.5"
    assert reading(rows).startswith(verdict)
    rows[1] = _row("sgt", 0.515, 0.03)  # within the seeds' spread
    assert "+0.015 vs baseline (within 1 std)" in reading(rows)
    assert reading(rows[1:]) == "No baseline row: nothing to compare against."


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
