"""The recipes' checkpoints: ``step_N`` / ``epoch_N`` folders of ``accelerator.save_state``, as in
Accelerate's ``complete_cv_example.py``, plus what Accelerate does not do for a loop:

- the run's identity (data, model, batch, seed, every method field) in ``recipe_state.json`` beside
  the state, so a resume under other settings is refused before any tensor is loaded;
- an atomic save (a staging folder renamed into place): ``--resume_from_checkpoint latest`` never
  finds half a checkpoint after a crash;
- the position and history a resume continues from, and ``--checkpoints_total_limit`` rotation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..core.arguments import EXECUTION_FIELDS, SaliencyDecorArguments
from ..storage.checkpoint import explain_save_error
from .recipe_arguments import RecipeArguments, scalar_values

__all__ = [
    "STATE_FILE",
    "checkpoint_step",
    "find_checkpoint",
    "identity_difference",
    "latest_checkpoint",
    "read_checkpoint_state",
    "remove_old_checkpoints",
    "run_identity",
    "save_checkpoint_atomically",
    "saved_checkpoints",
]

STATE_FILE = "recipe_state.json"


def run_identity(args: RecipeArguments, method_args: SaliencyDecorArguments, num_processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: data, model, batch, seed and every method field.

    The method fields shape the state (``group_size`` the whitening buffers, ``method`` whether they
    exist) or the trajectory (``mask_ratio``, weights), so a resume under other values is refused
    up front instead of failing on a tensor shape or silently training another objective. Only the
    execution fields (``EXECUTION_FIELDS``: checks and strategies with the same values) may change.
    """
    method_fields = {k: v for k, v in sorted(scalar_values(method_args.to_dict()).items()) if k not in EXECUTION_FIELDS}
    return {
        "model": args.model,
        "dataset": args.dataset_name or [args.train_dir, args.validation_dir],
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes,
        "seed": args.seed,
        "peft": args.peft,
        **method_fields,
    }


def checkpoint_step(folder: str | Path) -> int:
    """The optimizer step a ``step_N`` / ``epoch_N`` checkpoint folder was saved at."""
    state = Path(folder) / STATE_FILE
    if not state.is_file():
        raise ValueError(f"{folder} is not a checkpoint of a recipe run (no {STATE_FILE}).")
    return int(json.loads(state.read_text())["completed_steps"])


def saved_checkpoints(output_dir: Path) -> list[Path]:
    """This run's complete checkpoints (``step_N`` / ``epoch_N`` with a state file), oldest first."""
    return sorted((p for p in output_dir.glob("*_*") if p.is_dir() and (p / STATE_FILE).is_file()), key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` (``--resume_from_checkpoint latest``), or ``None``."""
    saved = saved_checkpoints(output_dir)
    return saved[-1] if saved else None


def save_checkpoint_atomically(
    accelerator: Any, folder: Path, completed_steps: int, identity: dict[str, Any], history: list[dict[str, float]]
) -> None:
    """``save_state`` into a temporary folder, renamed into place: a crash never leaves half a checkpoint."""
    staging = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"completed_steps": completed_steps, "identity": identity, "history": history}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
    except (OSError, RuntimeError) as error:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # no half-written checkpoint left behind
        raise explain_save_error(error, folder) from error
    accelerator.wait_for_everyone()


def identity_difference(saved: dict | None, current: dict) -> str:
    """The settings that differ between a checkpoint's run and this one, ``name: saved -> now``."""
    if saved is None or not isinstance(saved.get("identity"), dict):
        return f"it has no readable {STATE_FILE}"
    before = saved["identity"]
    changed = [
        f"{key}: {before.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}"
        for key in sorted(set(before) | set(current))
        if before.get(key) != current.get(key)
    ]
    return "it was saved with other settings (" + "; ".join(changed) + ")"


def find_checkpoint(checkpoint: str, output_dir: Path) -> Path:
    """``--resume_from_checkpoint``'s folder: ``latest`` of ``output_dir``, a path, or a folder name in it."""
    folder = Path(checkpoint)
    if checkpoint == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}.")
        return found
    if not folder.is_absolute() and not folder.is_dir() and (output_dir / folder).is_dir():
        folder = output_dir / folder  # `step_8`: a checkpoint of --output_dir, as `latest` finds them
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {checkpoint}: neither {folder} nor {output_dir / checkpoint} exists."
        )
    return folder


def read_checkpoint_state(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The saved position and history of ``folder``, refused (``ValueError``) if another run's identity saved it."""
    saved = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else None
    current = json.loads(json.dumps(identity))
    if saved is None or saved.get("identity") != current:
        raise ValueError(f"{folder} is not a checkpoint of this run: {identity_difference(saved, current)}.")
    return saved


def remove_old_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints (``--checkpoints_total_limit``); ``None`` keeps all."""
    if limit is not None:
        for old in saved_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)
