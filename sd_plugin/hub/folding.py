"""Moved to ``sd_plugin.folding`` (the checkpoint format uses it too); kept as an alias for 0.2."""

from ..folding import block_diagonal_whitening, find_whitening, fold_whitening_into_head, strip_sd_hooks

__all__ = ["find_whitening", "fold_whitening_into_head", "strip_sd_hooks", "block_diagonal_whitening"]
