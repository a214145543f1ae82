"""The HTTP server: the OpenAI-compatible routes (routes.py), health, Prometheus metrics and the web chat page.

Generation runs in reader threads (streaming.py) over Models whose backends are continuous-batching schedulers;
the event loop only moves pieces to the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slmkit.serve import openai_compat as oa
from slmkit.serve.errors import HTTPError
from slmkit.serve.limits import MAX_TOKENS_LIMIT
from slmkit.serve.metrics import Metrics
from slmkit.serve.registry import ModelRegistry
from slmkit.serve.routes import Server, openai_routes

WEB = Path(__file__).parent / "web"


def create_app(registry: ModelRegistry, metrics: Metrics, *, api_key: str | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT,
               shutdown_timeout: float = 10.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(registry.stop, shutdown_timeout)  # finish running requests, then cancel

    app = FastAPI(title="slmkit", lifespan=lifespan)

    @app.exception_handler(HTTPError)
    async def _http_error(_req: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(oa.error_body(f"invalid request: {where or 'body'}: {first.get('msg', 'bad value')}", param=where or None), status_code=422)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": registry.names, "loaded": registry.loaded()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    app.include_router(openai_routes(Server(registry, metrics, api_key, max_tokens_limit)))
    return app
