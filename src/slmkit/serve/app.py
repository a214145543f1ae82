"""The HTTP server: the OpenAI-compatible routes (routes.py), health, Prometheus metrics and the web chat page.

Generation runs in reader threads (streaming.py) over Models whose backends are continuous-batching schedulers;
the event loop only moves pieces to the client.
"""

from __future__ import annotations

import asyncio
import hmac
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
from slmkit.serve.responses_routes import responses_routes
from slmkit.serve.ollama_manage import manage_routes
from slmkit.serve.ollama_routes import ollama_error, ollama_routes
from slmkit.serve.routes import OpenAIApi, Server, openai_routes

WEB = Path(__file__).parent / "web"
KEEP_ALIVE_CHECK_S = 1.0  # how often models past their keep_alive are looked for


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a parsed JSON body holds text that is not Unicode (a lone surrogate such as \\ud800, which no encoder
    takes): the field's path, or None. Keys are checked too."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if (found := lone_surrogate(k, where)) or (found := lone_surrogate(v, where)):
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if found := lone_surrogate(v, f"{path}[{i}]"):
                return found
    return None


class Boundary:
    """ASGI middleware, the one gate every request passes before a handler sees it:
    - the API key (with --api-key) on /v1, /api, /tokenize, /detokenize and /metrics (unless opened), checked before the body is read: an
      unauthenticated caller learns nothing about parsing;
    - the body size: over `max_bytes` (by Content-Length, or counted as it arrives) is a 413;
    - text: a JSON body with a lone surrogate in any string (or key) is a 400 naming the field, so no encoder
      downstream ever sees one;
    - Ollama's clients (and its curl examples) send JSON without a JSON content type: /api bodies are read as JSON.
    Errors come in the shape of the route's API: OpenAI's for /v1 and the rest, Ollama's {"error": ...} for /api."""

    def __init__(self, app: Any, max_bytes: int, api_key: str | None = None, open_metrics: bool = False) -> None:
        self.app, self.max_bytes, self.api_key, self.open_metrics = app, max_bytes, api_key, open_metrics

    def _keyed(self, path: str) -> bool:
        return (path.startswith(("/v1/", "/api/")) or path in ("/tokenize", "/detokenize")
                or (path == "/metrics" and not self.open_metrics))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope.get("path", ""), dict(scope.get("headers") or [])
        if self.api_key and self._keyed(path) and scope.get("method") != "OPTIONS":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                await self._refuse(send, path, 401, "missing or wrong API key: send Authorization: Bearer KEY",
                                   code="invalid_api_key", type_="authentication_error")
                return
        if path.startswith("/api/blobs/"):  # uploads stream to their handler, which checks the digest (no size limit)
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, path, 413, f"the request body is over this server's limit of {self.max_bytes} bytes",
                               code="request_too_large")
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(send, path, 413, f"the request body is over this server's limit of {self.max_bytes} bytes",
                                   code="request_too_large")
                return
        try:
            parsed = json.loads(body) if body.strip() else None
        except (ValueError, RecursionError):
            parsed = None  # not JSON: the handler's own validation says so
        if (where := lone_surrogate(parsed)) is not None:
            await self._refuse(send, path, 400, f"invalid request: {where}: contains a lone surrogate: not valid Unicode text",
                               param=where)
            return
        if path.startswith("/api/") and parsed is not None:  # JSON whatever the declared content type
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, path: str, status: int, message: str, **kw: Any) -> None:
        payload = {"error": message} if path.startswith("/api/") else oa.error_body(message, **kw)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def create_app(registry: ModelRegistry, metrics: Metrics, *, api_key: str | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT,
               shutdown_timeout: float = 10.0, max_body_bytes: int = MAX_BODY_BYTES, cors_origins: list[str] | None = None,
               docs: bool = False, open_metrics: bool = False, allow_model_changes: bool = False, speculative: int = 0) -> FastAPI:
    """The server. `docs` serves /docs and /openapi.json (off by default: they describe the API to anyone who asks);
    `open_metrics` serves /metrics without the API key when there is one; Ollama's pull, create, copy and delete
    change the store only with `allow_model_changes` or an API key; `speculative`: the drafted tokens a request checks
    per step when it does not say (0: off)."""
    async def reap() -> None:  # models whose keep_alive has passed are freed once idle (Ollama's timed unload)
        while True:
            await asyncio.sleep(KEEP_ALIVE_CHECK_S)
            for name in registry.expired():
                if not await asyncio.to_thread(registry.unload, name):
                    registry.expires.pop(name, None)  # it cannot be freed alone (a router's, a shared base)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(reap())
        yield
        reaper.cancel()
        await asyncio.to_thread(registry.stop, shutdown_timeout)  # finish running requests, then cancel

    hidden: dict[str, Any] = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="slmkit", lifespan=lifespan, **hidden)
    app.add_middleware(Boundary, max_bytes=max_body_bytes, api_key=api_key, open_metrics=open_metrics)
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
    async def _invalid(req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = str(first.get("msg", "bad value"))
        if req.url.path.startswith("/api/"):  # Ollama answers a bad request with 400 and {"error": "..."}
            return JSONResponse({"error": f"invalid request: {where or 'body'}: {msg}"}, status_code=400)
        return JSONResponse(oa.error_body(f"invalid request: {where or 'body'}: {msg}", param=where or None), status_code=422)

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

    server = Server(registry, metrics, max_tokens_limit, allow_changes=allow_model_changes or api_key is not None,
                    speculative=speculative)
    openai = OpenAIApi(server)
    app.include_router(openai_routes(openai))
    app.include_router(responses_routes(server, openai.chat_completions))  # OpenAI's Responses API over the chat route
    app.include_router(ollama_routes(server))  # Ollama's native API beside it
    app.include_router(manage_routes(server, ollama_error))  # and its model management
    return app
