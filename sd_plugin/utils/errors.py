"""Exceptions raised by sd-plugin."""

__all__ = ["NonFiniteLossError", "SaliencyDecorWarning"]


class NonFiniteLossError(FloatingPointError):
    """A loss component (or the features it reads) became NaN or infinite; training must stop."""


class SaliencyDecorWarning(UserWarning):
    """A setting, input or saved folder that works but probably not as intended (each says the fix).

    Its own category, so it can be filtered (``warnings.simplefilter("error", SaliencyDecorWarning)``
    turns every such warning into an error, as the package's test suite does).
    """
