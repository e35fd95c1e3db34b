"""Export a trained model and, when a repository is named, push it: the one path both front-ends publish by.

``SaliencyDecorTrainer.push_to_hub`` and the recipes' ``--push_to_hub`` both call ``publish``; the
commands ``python -m sd_plugin export`` / ``push`` are its two halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .export import export
from .push import push

__all__ = ["Published", "publish"]


@dataclass(frozen=True)
class Published:
    """Where ``publish`` wrote the export, and the commit (or pull request) URL when it pushed."""

    folder: Path
    url: str | None = None


def publish(
    source: Any,
    folder: str | Path,
    *,
    repo_id: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str = "Upload SaliencyDecor model",
    **export_options: Any,
) -> Published:
    """``export(source, folder, overwrite=True, **export_options)``, then ``push`` it to ``repo_id`` if given.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from sd_plugin.core.models import PaperCNN
        >>> with tempfile.TemporaryDirectory() as out:
        ...     published = publish(PaperCNN.mnist(), Path(out) / "model")  # no repo_id: export only
        ...     published.url, (published.folder / "README.md").is_file()
        (None, True)
    """
    written = export(source, folder, overwrite=True, **export_options)
    if repo_id is None:
        return Published(written)
    url = push(written, repo_id, private=private, create_pr=create_pr, token=token, commit_message=commit_message)
    return Published(written, url)
