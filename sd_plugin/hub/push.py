"""Push an exported folder to the Hugging Face Hub (``HfApi.create_repo`` + ``upload_folder``).

Every publishing path (``python -m sd_plugin push``, ``SaliencyDecorTrainer.push_to_hub``
and the recipes' ``--push_to_hub``) goes through ``push``. The endpoint follows
``HF_ENDPOINT``; the token comes from ``token=``, ``HF_TOKEN`` or ``hf auth login``. Without
a token or a network the error says so, and the exported folder stays complete on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..core.families import REPO_ID_PLACEHOLDER

__all__ = ["PushError", "check_push_credentials", "push", "validate_repo_id"]


class PushError(RuntimeError):
    """The upload failed; the local folder is untouched."""


def validate_repo_id(repo_id: str) -> str:
    """``user/name`` with the Hub's allowed characters, or a ``ValueError`` saying why."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id={repo_id!r} must look like 'user-or-org/model-name'.")
    try:
        hub_validate(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repository id: {error}") from error
    return repo_id


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; export the model first (sd_plugin.hub.export).")
    names = {p.name for p in folder.iterdir()}
    weights = {"model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json"}
    if "README.md" not in names or not names & weights:
        raise ValueError(
            f"{folder} is not an exported model folder (needs README.md and safetensors weights); "
            "run `python -m sd_plugin export` or sd_plugin.hub.export first."
        )


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of the HTTP client huggingface_hub uses (httpx2 / httpx, or requests before 1.0)."""
    import importlib

    errors: list[type[BaseException]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


@contextlib.contextmanager
def _staged_with_repo_id(folder: Path, repo_id: str) -> Iterator[Path]:
    """A temporary mirror of ``folder`` (hard links, copies across devices) whose card names ``repo_id``."""
    with tempfile.TemporaryDirectory(prefix="sd_plugin_push_") as scratch:
        staged = Path(scratch) / folder.name
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            target = staged / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path == folder / "README.md":
                text = path.read_text(encoding="utf-8").replace(REPO_ID_PLACEHOLDER, repo_id)
                target.write_text(text, encoding="utf-8")
                continue
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        yield staged


def check_push_credentials(repo_id: str | None, token: str | None = None) -> str:
    """The token to push to ``repo_id`` with, checked without the network (before a training run).

    Raises ``ValueError`` for a missing or malformed id and ``PushError`` without a token.
    """
    from huggingface_hub import get_token

    if not repo_id:
        raise ValueError("push_to_hub needs hub_model_id='user-or-org/model-name' (--hub_model_id).")
    validate_repo_id(repo_id)
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token).")
    return token


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str = "Upload SaliencyDecor model",
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    validate_repo_id(repo_id)
    _check_folder(folder)
    try:
        token = check_push_credentials(repo_id, token)
    except PushError as error:
        raise PushError(f"{error} The exported folder {folder} is complete and can be pushed later.") from None
    # The card names the repository; it is filled in a staging copy (files hard-linked, not copied),
    # so the folder stays as it was: a failed push, or a later push to another id, never publishes a
    # stale id.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        with _staged_with_repo_id(folder, repo_id) as staged:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                folder_path=str(staged), repo_id=repo_id, commit_message=commit_message, create_pr=create_pr
            )
    except (HfHubHTTPError, OSError, *_network_errors()) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise PushError(
            f"could not push {folder} to {repo_id} ({type(error).__name__}: {first_line}); "
            "check the network, HF_ENDPOINT and the token's write access. The folder is unchanged on disk."
        ) from None
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
