"""How failures become HTTP answers in OpenAI's error format (pure: no FastAPI state)."""

from __future__ import annotations

from typing import Any

from slmkit.engine.scheduler import QueueFull
from slmkit.errors import ModelNotFound, PromptTooLong, SlmkitError
from slmkit.serve import openai_compat as oa


class HTTPError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


class Refused(SlmkitError):
    """Something this server was not started to do (403): changing its store without --allow-model-changes."""


def to_http(exc: BaseException) -> HTTPError:
    """The HTTP error for any failure: 404 unknown model, 429 queue full, 403 refused, 400 bad input, 500 anything else."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, Refused):
        return HTTPError(403, oa.error_body(f"{exc.message}. {exc.hint}", type_="permission_error", code="forbidden"))
    if isinstance(exc, ModelNotFound):
        return HTTPError(404, oa.error_body(f"{exc.message}. {exc.hint}", code="model_not_found", param="model"))
    if isinstance(exc, QueueFull):
        return HTTPError(429, oa.error_body(f"{exc.message}. {exc.hint}", type_="rate_limit_error", code="queue_full"), {"Retry-After": "1"})
    if isinstance(exc, PromptTooLong):
        return HTTPError(400, oa.error_body(f"{exc.message}. {exc.hint}", code="context_length_exceeded", param="messages"))
    if isinstance(exc, SlmkitError):
        return HTTPError(400, oa.error_body(f"{exc.message}. {exc.hint}".strip(". ")))
    return HTTPError(500, oa.error_body(f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))
