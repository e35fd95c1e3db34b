"""The built wheel and sdist ship everything the package reads at run time (issue 11, item 1).

A wheel install used to miss the model-card template (a symlink into the repository), so `export`,
the end of a recipe run and `push` failed outside a source checkout.
"""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_FILES = ("sd_plugin/py.typed", "sd_plugin/hub/model_card.md")


def build(kind: str, directory: Path) -> Path:
    """``setuptools.build_meta`` as pip would call it (no network, the environment's setuptools)."""
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(directory)!r}))"
    name = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    return directory / name


def trained_folder(tmp_path: Path) -> Path:
    from test_hub import train  # the tiny trained model the export tests use

    train("hf_resnet", tmp_path, steps=1).save_model()
    return tmp_path / "run"


def test_wheel__installed_outside_the_repository_exports_a_model_with_its_card(tmp_path):
    wheel = build("wheel", tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert set(RUNTIME_FILES) <= names
    # an SPDX license expression: setuptools deprecates the `license = {text = ...}` table (issue 22, item 7)
    assert "License-Expression: Apache-2.0" in metadata
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site), wheel],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import sd_plugin; print(sd_plugin.__file__)"],
        cwd=outside,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the source tree
    source = trained_folder(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "sd_plugin", "export", str(source), str(tmp_path / "exported")],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "SaliencyDecor" in card
    # a recipe run to its end (the exported model/ with its card) on the installed package
    recipe = [sys.executable, str(ROOT / "recipes" / "paper_cnn.py"), "--dataset", "digits"]
    recipe += ["--output_dir", str(tmp_path / "recipe"), "--max_train_steps", "2", "--eval_masking_samples", "16"]
    result = subprocess.run(recipe, cwd=outside, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "recipe" / "model" / "README.md").is_file()
    # the release (issue 41): its version, the commands' help and one SaliencyDecorTrainer step, installed
    version = subprocess.run(
        [sys.executable, "-m", "sd_plugin", "--version"], cwd=outside, env=env, capture_output=True, text=True
    )
    assert version.stdout.strip() == f"sd-plugin {released_version()}", version.stdout + version.stderr
    demo_help = subprocess.run(
        [sys.executable, "-m", "sd_plugin", "demo", "--help"], cwd=outside, env=env, capture_output=True, text=True
    )
    assert demo_help.returncode == 0 and "--output-dir" in demo_help.stdout, demo_help.stderr[-2000:]
    step = subprocess.run(
        [sys.executable, "-c", TRAINER_STEP, str(tmp_path / "trainer")],
        cwd=outside,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert step.returncode == 0 and "global_step 1" in step.stdout, step.stderr[-3000:]


TRAINER_STEP = """
import sys, torch
from transformers import ResNetConfig, ResNetForImageClassification
from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer
config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(8)]
args = SaliencyDecorConfig(output_dir=sys.argv[1], max_steps=1, per_device_train_batch_size=8, report_to="none",
                           use_cpu=True, group_size=4, method="saliencydecor")
trainer = SaliencyDecorTrainer(model=ResNetForImageClassification(config), args=args, train_dataset=data)
print("global_step", trainer.train().global_step)
"""


def released_version() -> str:
    """The newest version in CHANGELOG.md (``## [X.Y.Z] - date``), which the package must carry."""
    import re

    match = re.search(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert match, "CHANGELOG.md has no released version (## [X.Y.Z] - YYYY-MM-DD)"
    return match.group(1)


def test_release__the_package_version_is_the_changelogs_newest_and_unreleased_sits_above_it():
    from sd_plugin.utils.version import __version__

    text = (ROOT / "CHANGELOG.md").read_text()
    assert __version__ == released_version()
    assert text.index("## [Unreleased]") < text.index(f"## [{__version__}]")


def test_sdist__holds_the_card_template_as_a_file():
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        sdist = build("sdist", Path(directory))
        with tarfile.open(sdist) as archive:
            members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}
    for name in RUNTIME_FILES:
        assert name in members and members[name].isfile(), name


def test_ci__runs_the_test_suite_before_installing_outside_data():
    """A test that needs apt-installed data and does not skip without it fails CI (as on a new user's machine)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    make_test = commands.index("make test")
    installs = [i for i, line in enumerate(commands) if "apt-get install" in line]
    assert installs and min(installs) > make_test
    assert commands.index("make test-real-data") > max(installs)
