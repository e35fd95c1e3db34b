"""Deprecated module name (0.1): the model adapter lives in ``sd_plugin.adapter``; kept until 0.2."""

from .adapter import ModelAdapter, adapt, library_of, unwrap_model

__all__ = ["ModelAdapter", "adapt", "library_of", "unwrap_model"]
