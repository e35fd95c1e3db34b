"""Push an exported folder to the Hugging Face Hub (``HfApi.create_repo`` + ``upload_folder``).

Every publishing path (``python -m sd_plugin push``, ``SaliencyDecorTrainer.push_to_hub``
and the recipes' ``--push_to_hub``) goes through ``push``. The endpoint follows
``HF_ENDPOINT``; the token comes from ``token=``, ``HF_TOKEN`` or ``hf auth login``. Without
a token or a network the error says so, and the exported folder stays complete on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from .export import REPO_ID_PLACEHOLDER

__all__ = ["PushError", "push", "validate_repo_id"]


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
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    validate_repo_id(repo_id)
    _check_folder(folder)
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token); "
            f"the exported folder {folder} is complete and can be pushed later."
        )
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8")
    if REPO_ID_PLACEHOLDER in text:
        card.write_text(text.replace(REPO_ID_PLACEHOLDER, repo_id), encoding="utf-8")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, create_pr=create_pr
        )
    except (HfHubHTTPError, OSError) as error:
        raise PushError(
            f"could not push {folder} to {repo_id} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "check the network, HF_ENDPOINT and the token's write access. The folder is unchanged on disk."
        ) from error
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
