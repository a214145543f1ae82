"""One error type that carries what went wrong and what to do about it; the CLI prints both and exits 1."""

from __future__ import annotations


class SlmkitError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class ModelNotFound(SlmkitError):
    pass


class InvalidName(SlmkitError):
    pass


class ImportFailed(SlmkitError):
    pass


class PromptTooLong(SlmkitError):
    pass


class BrokenModel(SlmkitError):
    """A store folder whose card cannot be read, or whose files are damaged."""


class Unsupported(SlmkitError):
    """A request field or content a server does not serve (400, never silently dropped)."""
