"""The package version, in one place (``pyproject.toml`` reads it from here)."""

__version__ = "0.1.0"  # the newest release in CHANGELOG.md (tests/test_packaging.py checks they agree)
