"""Runs and the folders they write: one run per folder, crashes mid-write, full disks, permissions, credentials."""

import errno
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models

from sd_plugin import SaliencyDecorTrainer, SaliencyDecorWarning
from sd_plugin.hub import export
from sd_plugin.storage.checkpoint import explain_save_error
from sd_plugin.utils.run_lock import LOCK_FILE, OutputDirInUseError, output_dir_lock

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import os, sys, torch
sys.path.insert(0, "tests")
import tiny_models
from sd_plugin import SaliencyDecorConfig, SaliencyDecorTrainer

def data():
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(32)]

def args(output_dir):
    return SaliencyDecorConfig(output_dir=output_dir, max_steps=6, per_device_train_batch_size=16, group_size=8,
                               save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
                               disable_tqdm=True, seed=0, data_seed=0)
"""

KILLED_WHILE_SAVING = """
from transformers import Trainer
original = Trainer._save_optimizer_and_scheduler

def save_then_die(self, output_dir):
    if self.state.global_step == 4:  # the second checkpoint: the process dies half-way through writing it
        open(os.path.join(output_dir, "optimizer.pt"), "wb").close()
        os.kill(os.getpid(), 9)
    original(self, output_dir)

Trainer._save_optimizer_and_scheduler = save_then_die
model = tiny_models.build("hf_resnet", __import__("pathlib").Path(sys.argv[1]))
SaliencyDecorTrainer(model=model, args=args(sys.argv[2]), train_dataset=data()).train()
"""


def test_trainer__kill_9_while_saving_a_checkpoint__resume_true_continues_from_the_last_complete_one(tmp_path):
    output = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    killed = subprocess.run(
        [sys.executable, "-c", TRAIN + KILLED_WHILE_SAVING, str(tmp_path), str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (output / "checkpoint-4" / "optimizer.pt").stat().st_size == 0
    assert not (output / "checkpoint-4" / "trainer_state.json").exists()
    namespace: dict = {}
    exec(TRAIN, namespace)  # the same data and arguments, in this process
    trainer = SaliencyDecorTrainer(
        model=tiny_models.build("hf_resnet", tmp_path),
        args=namespace["args"](str(output)),
        train_dataset=namespace["data"](),
    )
    with pytest.warns(SaliencyDecorWarning, match=r"skipped the incomplete checkpoint\(s\) \['checkpoint-4'\]"):
        result = trainer.train(resume_from_checkpoint=True)
    assert result.global_step == 6 and (output / "checkpoint-6" / "trainer_state.json").is_file()


def test_full_disk__named_with_the_fix_and_nothing_half_written_kept(tmp_path, monkeypatch):
    explained = explain_save_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "step_2")
    assert explained.errno == errno.ENOSPC and "--checkpoints_total_limit" in str(explained)
    # torch's writer says only "iostream error": read the free space
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    explained = explain_save_error(RuntimeError("basic_ios::clear: iostream error"), tmp_path / "step_2")
    assert isinstance(explained, OSError) and "No space left on device" in str(explained)
    monkeypatch.undo()
    other = RuntimeError("something else")
    assert explain_save_error(other, tmp_path) is other
    # the recipe's atomic save: a failing save_state leaves no staging folder
    from accelerate import Accelerator

    from sd_plugin.integrations.recipe_checkpoints import save_checkpoint_atomically

    accelerator = Accelerator(cpu=True)

    def failing_save_state(folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(accelerator, "save_state", failing_save_state)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint_atomically(accelerator, tmp_path / "step_2", 2, {}, [])
    assert list(tmp_path.iterdir()) == []


def test_one_run_per_output_dir__a_second_live_run_is_refused_a_stale_lock_taken_over(tmp_path):
    lock = tmp_path / LOCK_FILE
    with output_dir_lock(tmp_path):
        assert lock.is_file()
        # a recipe started on the same folder stops before training
        command = [sys.executable, "recipes/tiny_imagenet.py", "--output_dir", str(tmp_path), "--model", "./absent"]
        refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "is in use by another run" in refused.stderr
    assert not lock.exists()
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": 999999999, "host": host}))  # its run ended
    with output_dir_lock(tmp_path):
        pass
    with output_dir_lock(tmp_path), output_dir_lock(tmp_path):  # the same process may take it again
        pass
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process
    with pytest.raises(OutputDirInUseError, match="is in use by another run"):
        with output_dir_lock(tmp_path):
            pass


def test_export__overwrite_replaces_only_an_earlier_export_and_the_folder_is_readable(tmp_path):
    model = tiny_models.build("timm_resnet", tmp_path)
    target = tmp_path / "exported"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an earlier export.*notes.txt.*would delete them"):
        export(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "saliency_decor.json").write_text('{"method": "sgt"}')  # a training run's folder, not an export
    with pytest.raises(FileExistsError, match="is not an earlier export"):
        export(model, target, overwrite=True)
    (target / "notes.txt").unlink()
    (target / "saliency_decor.json").unlink()
    export(model, target)
    export(model, target, overwrite=True)  # an earlier export: replaced
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask


def test_trainer__finished_run_refused_unless_resumed_or_overwritten(tmp_path):
    """``train()`` into an output_dir holding a previous run: refused; ``overwrite_output_dir`` deletes it first."""
    from sd_plugin.utils.previous_run import PreviousRunError

    namespace: dict = {}
    exec(TRAIN, namespace)
    output = tmp_path / "run"

    def trainer(max_steps, **fields):
        args = namespace["args"](str(output))
        args.max_steps = max_steps
        for name, value in fields.items():
            setattr(args, name, value)
        return SaliencyDecorTrainer(
            model=tiny_models.build("hf_resnet", tmp_path), args=args, train_dataset=namespace["data"]()
        )

    finished = trainer(6)
    finished.train()
    finished.save_model()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    weights = (output / "model.safetensors").read_bytes()
    with pytest.raises(PreviousRunError, match=r"resume_from_checkpoint=True.*overwrite_output_dir=True"):
        trainer(2).train()
    assert (output / "model.safetensors").read_bytes() == weights  # nothing of the finished run touched
    trainer(2, overwrite_output_dir=True).train()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's deleted
    assert not (output / "model.safetensors").exists()
    assert trainer(4).train(resume_from_checkpoint=True).global_step == 4  # resuming is still allowed
