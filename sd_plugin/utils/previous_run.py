"""A finished run in an output folder is never overwritten silently: resume it, or say overwrite.

A front-end names the files and folders its runs write (``patterns``, globs relative to the
folder). A new run (not a resume) into a folder holding any of them is refused with an error that
names both ways on; with ``overwrite`` those files are removed first, so the new run's checkpoints
never sit beside the old run's (a later "resume from the latest checkpoint" could pick the old one).

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> (folder / "checkpoint-20").mkdir()
    >>> guard_previous_run(folder, ["checkpoint-*"], overwrite=False, resume_hint="resume_from_checkpoint=True",
    ...                    overwrite_hint="overwrite_output_dir=True")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sd_plugin.utils.previous_run.PreviousRunError: output_dir ... holds a previous run (checkpoint-20): ...
    >>> guard_previous_run(folder, ["checkpoint-*"], overwrite=True, resume_hint="", overwrite_hint="")
    ['checkpoint-20']
    >>> (folder / "checkpoint-20").exists()
    False
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["PreviousRunError", "previous_run_files", "guard_previous_run"]


class PreviousRunError(FileExistsError):
    """The output folder holds a previous run, and the new one neither resumes it nor overwrites it."""


def previous_run_files(directory: str | Path, patterns: Iterable[str]) -> list[Path]:
    """The paths under ``directory`` that match ``patterns`` (a previous run's output), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted({path for pattern in patterns for path in directory.glob(pattern)})


def guard_previous_run(
    directory: str | Path,
    patterns: Iterable[str],
    *,
    overwrite: bool,
    resume_hint: str,
    overwrite_hint: str,
    remove: bool = True,
) -> list[str]:
    """Refuse a new run into a folder holding a previous one, or (``overwrite``) remove the previous run's files.

    Returns the names removed (or that the caller's main process removes: ``remove=False`` only checks).
    """
    directory = Path(directory)
    found = previous_run_files(directory, patterns)
    if not found:
        return []
    names = [str(path.relative_to(directory)) for path in found]
    if not overwrite:
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise PreviousRunError(
            f"output_dir {directory} holds a previous run ({shown}): training into it would overwrite that "
            f"run's model and mix the two runs' checkpoints. Resume it with {resume_hint}, train into another "
            f"output_dir, or set {overwrite_hint} to delete the previous run's files first."
        )
    if remove:
        for path in found:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return names
