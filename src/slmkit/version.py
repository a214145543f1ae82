"""The version, in one place: the package metadata (pyproject.toml) and the code read it from here."""

__version__ = "0.1.0"
