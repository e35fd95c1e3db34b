"""Deprecated module name (0.1): ``input_gradients`` lives in ``sd_plugin.evaluation.attribution``."""

from .attribution import input_gradients

__all__ = ["input_gradients"]
