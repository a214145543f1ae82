"""The HTTP server: the OpenAI-compatible routes (routes.py), health, Prometheus metrics and the web chat page.

Generation runs in reader threads (streaming.py) over Models whose backends are continuous-batching schedulers;
the event loop only moves pieces to the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slmkit.serve import openai_compat as oa
from slmkit.serve.errors import HTTPError
from slmkit.serve.limits import MAX_BODY_BYTES, MAX_TOKENS_LIMIT
from slmkit.serve.metrics import Metrics
from slmkit.serve.registry import ModelRegistry
from slmkit.serve.ollama_routes import ollama_routes
from slmkit.serve.routes import Server, openai_routes

WEB = Path(__file__).parent / "web"


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `max_bytes` (by Content-Length, or counted as it arrives) gets a
    413 in OpenAI's error format before any handler reads it whole."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(oa.error_body(f"the request body is over this server's limit of {self.max_bytes} bytes",
                                        code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(registry: ModelRegistry, metrics: Metrics, *, api_key: str | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT,
               shutdown_timeout: float = 10.0, max_body_bytes: int = MAX_BODY_BYTES, cors_origins: list[str] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(registry.stop, shutdown_timeout)  # finish running requests, then cancel

    app = FastAPI(title="slmkit", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if cors_origins:  # browsers on those origins may call the API (preflight OPTIONS answered)
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_req: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405 in OpenAI's format
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return JSONResponse(oa.error_body(str(exc.detail), code=kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(HTTPError)
    async def _http_error(_req: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = str(first.get("msg", "bad value"))
        status = 400 if "lone surrogate" in msg else 422  # well-formed JSON, but text that is not Unicode: a bad request
        return JSONResponse(oa.error_body(f"invalid request: {where or 'body'}: {msg}", param=where or None), status_code=status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": registry.names, "loaded": registry.loaded()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    app.mount("/vendor", StaticFiles(directory=WEB / "vendor"), name="vendor")  # the page's Markdown libraries

    server = Server(registry, metrics, api_key, max_tokens_limit)
    app.include_router(openai_routes(server))
    app.include_router(ollama_routes(server))  # Ollama's native API beside it
    return app
