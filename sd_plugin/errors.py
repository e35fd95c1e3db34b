"""Exceptions raised by sd-plugin."""

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss component (or the features it reads) became NaN or infinite; training must stop."""
