"""Publishing: export with zero inference overhead, model cards, push to the Hub."""

from ..core.folding import fold_whitening_into_head
from .card import render_model_card
from .export import export
from .publish import Published, publish
from .push import PushError, push, validate_repo_id

__all__ = [
    "Published",
    "PushError",
    "export",
    "fold_whitening_into_head",
    "publish",
    "push",
    "render_model_card",
    "validate_repo_id",
]
