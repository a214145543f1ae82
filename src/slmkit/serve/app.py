"""The HTTP server: OpenAI-compatible routes over the Model API, metrics, auth and the web chat page.

Generation runs in reader threads (one per choice) that pull text pieces from a Model's Generation, whose
backend is a continuous-batching scheduler; the event loop only moves pieces to the client.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slmkit.engine.scheduler import QueueFull
from slmkit.errors import ModelNotFound, PromptTooLong, SlmkitError
from slmkit.model import Generation, Model
from slmkit.serve import openai_compat as oa
from slmkit.serve.limits import MAX_TOKENS_LIMIT
from slmkit.serve.metrics import Metrics
from slmkit.serve.registry import BadRequest, ModelRegistry

WEB = Path(__file__).parent / "web"
_DONE = object()


class HTTPError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


def _to_http(exc: BaseException) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ModelNotFound):
        return HTTPError(404, oa.error_body(f"{exc.message}. {exc.hint}", code="model_not_found", param="model"))
    if isinstance(exc, QueueFull):
        return HTTPError(429, oa.error_body(f"{exc.message}. {exc.hint}", type_="rate_limit_error", code="queue_full"), {"Retry-After": "1"})
    if isinstance(exc, PromptTooLong):
        return HTTPError(400, oa.error_body(f"{exc.message}. {exc.hint}", code="context_length_exceeded", param="messages"))
    if isinstance(exc, SlmkitError):
        return HTTPError(400, oa.error_body(f"{exc.message}. {exc.hint}".strip(". ")))
    return HTTPError(500, oa.error_body(f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))


class _Choice:
    """One generation running in a reader thread; pieces arrive on an asyncio queue."""

    def __init__(self, index: int, gen: Generation, loop: asyncio.AbstractEventLoop) -> None:
        self.index, self.gen = index, gen
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stop = threading.Event()
        self._loop = loop
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        push: Callable[[Any], None] = lambda item: self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        try:
            for piece in self.gen:
                push(piece)
                if self.stop.is_set():
                    break
        except BaseException as exc:
            push(exc)
        finally:
            self.gen.close()  # cancels the request in the scheduler: its batch slot is freed
            push(_DONE)


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

    def auth(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPError(401, oa.error_body("missing or wrong API key: send Authorization: Bearer KEY", type_="authentication_error", code="invalid_api_key"))

    def start(model: Model, body: oa._Sampling, make: Callable[[dict[str, Any]], Generation]) -> list[_Choice]:
        limit = body.max_completion_tokens or body.max_tokens
        if limit is not None and limit > max_tokens_limit:
            raise BadRequest(f"max_tokens {limit} is over this server's limit of {max_tokens_limit}", "Ask for fewer tokens.")
        loop = asyncio.get_running_loop()
        choices = []
        for i in range(body.n):
            kw = oa.sampling_kwargs(body, i)
            kw.setdefault("max_tokens", max_tokens_limit)
            choices.append(_Choice(i, make(kw), loop))
        return choices

    async def first_items(choices: list[_Choice], t0: float, model: str) -> list[Any]:
        """Wait for each choice's first item, so queue-full and other errors become HTTP errors before streaming."""
        firsts = [await c.queue.get() for c in choices]
        for item in firsts:
            if isinstance(item, BaseException):
                for c in choices:
                    c.stop.set()
                raise _to_http(item)
        metrics.ttft.labels(model).observe(time.perf_counter() - t0)
        return firsts

    async def watch_disconnect(request: Request, choices: list[_Choice]) -> None:
        while not all(c.stop.is_set() for c in choices):
            if await request.is_disconnected():
                for c in choices:
                    c.stop.set()
                return
            await asyncio.sleep(0.1)

    async def collect(request: Request, choices: list[_Choice], firsts: list[Any]) -> list[str]:
        watcher = asyncio.create_task(watch_disconnect(request, choices))
        try:
            texts = []
            for c, first in zip(choices, firsts):
                item = first
                while item is not _DONE:
                    if isinstance(item, BaseException):
                        raise _to_http(item)
                    item = await c.queue.get()
                texts.append(c.gen.text)
            return texts
        finally:
            for c in choices:
                c.stop.set()
            watcher.cancel()

    def count(endpoint: str, model: str, status: int) -> None:
        metrics.requests.labels(endpoint, model, str(status)).inc()

    @asynccontextmanager
    async def counted(endpoint: str, model: str) -> AsyncIterator[None]:
        """Count the request by outcome; any failure becomes its HTTP error in OpenAI's format."""
        try:
            yield
        except Exception as exc:
            err = _to_http(exc)
            count(endpoint, model, err.status)
            raise err from None
        count(endpoint, model, 200)

    def account(model: str, choices: list[_Choice]) -> None:
        metrics.prompt_tokens.labels(model).inc(sum(c.gen.stats.prompt_tokens for c in choices))
        metrics.completion_tokens.labels(model).inc(sum(c.gen.stats.completion_tokens for c in choices))

    def logprobs_of(model: Model, gen: Generation) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
        """The generated tokens' log-probabilities under the model (before sampling filters) and the top ones, as
        the decode loop computed them while generating (EOS left out)."""
        b = model.backend
        steps = [s for s in gen.steps if s.token not in b.eos_token_ids]
        return ([b.decode([s.token]) for s in steps], [s.logprob for s in steps],
                [[(b.decode([t]), lp) for t, lp in s.top] for s in steps])

    async def stream_events(choices: list[_Choice], firsts: list[Any], model: str, chunk: Callable[[int, str | None, str | None], dict]) -> AsyncIterator[bytes]:
        merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(c: _Choice, first: Any) -> None:
            item = first
            while True:
                await merged.put((c.index, item))
                if item is _DONE:
                    return
                item = await c.queue.get()

        tasks = [asyncio.create_task(pump(c, f)) for c, f in zip(choices, firsts)]
        done, last = 0, time.perf_counter()
        try:
            for c in choices:
                yield f"data: {json.dumps(chunk(c.index, None, None))}\n\n".encode()  # role first, as OpenAI does
            while done < len(choices):
                index, item = await merged.get()
                if item is _DONE:
                    done += 1
                    c = choices[index]
                    yield f"data: {json.dumps(chunk(index, '', c.gen.stats.finish_reason or 'stop'))}\n\n".encode()
                    continue
                if isinstance(item, BaseException):
                    err = _to_http(item)
                    yield f"data: {json.dumps(err.body)}\n\n".encode()
                    continue
                now = time.perf_counter()
                metrics.itl.labels(model).observe(now - last)
                last = now
                yield f"data: {json.dumps(chunk(index, item, None))}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:  # the client went away or the stream ended: stop every generation, free the slots
            for c in choices:
                c.stop.set()
            for t in tasks:
                t.cancel()
            account(model, choices)

    # ---- routes -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": registry.names, "loaded": registry.loaded()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slmkit"} for n in registry.names]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: oa.ChatRequest, request: Request) -> Any:
        name = body.model or registry.names[0]
        t0 = time.perf_counter()
        async with counted("chat", name):
            model = await asyncio.to_thread(registry.get, body.model)
            if body.stream and body.logprobs:
                raise BadRequest("logprobs are returned only when stream is false", "Drop stream, or logprobs.")
            messages = [m.model_dump() for m in body.messages]
            choices = start(model, body, lambda kw: model.stream_chat(messages, **kw))
            firsts = await first_items(choices, t0, name)
        rid = oa.new_id("chatcmpl")
        if body.stream:
            def chunk(i: int, text: str | None, finish: str | None) -> dict:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return oa.chat_chunk(rid, name, i, delta, finish)
            return StreamingResponse(stream_events(choices, firsts, name, chunk), media_type="text/event-stream")
        texts = await collect(request, choices, firsts)
        account(name, choices)
        out = []
        for c, text in zip(choices, texts):
            lp = oa.chat_logprobs(*logprobs_of(model, c.gen)) if body.logprobs else None
            out.append(oa.chat_choice(c.index, text, c.gen.stats.finish_reason, lp))
        use = oa.usage(choices[0].gen.stats.prompt_tokens, sum(c.gen.stats.completion_tokens for c in choices))
        return oa.chat_response(rid, name, out, use)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: oa.CompletionRequest, request: Request) -> Any:
        name = body.model or registry.names[0]
        t0 = time.perf_counter()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        async with counted("completions", name):
            model = await asyncio.to_thread(registry.get, body.model)
            if not prompts:
                raise BadRequest("prompt is empty", "Send a prompt string.")
            if body.stream and body.logprobs:
                raise BadRequest("logprobs are returned only when stream is false", "Drop stream, or logprobs.")
            choices = []
            for p in prompts:
                for c in start(model, body, lambda kw, p=p: model.stream(p, **kw)):
                    c.index = len(choices)
                    choices.append(c)
            firsts = await first_items(choices, t0, name)
        rid = oa.new_id("cmpl")
        if body.stream:
            return StreamingResponse(
                stream_events(choices, firsts, name, lambda i, text, finish: oa.completion_chunk(rid, name, i, text or "", finish)),
                media_type="text/event-stream")
        texts = await collect(request, choices, firsts)
        account(name, choices)
        out = []
        for c, text in zip(choices, texts):
            lp = oa.completion_logprobs(*logprobs_of(model, c.gen)) if body.logprobs is not None else None
            out.append(oa.completion_choice(c.index, text, c.gen.stats.finish_reason, lp))
        use = oa.usage(sum(c.gen.stats.prompt_tokens for c in choices[:: body.n]), sum(c.gen.stats.completion_tokens for c in choices))
        return oa.completion_response(rid, name, out, use)

    @app.post("/v1/embeddings", dependencies=[Depends(auth)])
    async def embeddings(body: oa.EmbeddingRequest) -> Any:
        name = body.model or registry.names[0]
        texts = [body.input] if isinstance(body.input, str) else body.input
        async with counted("embeddings", name):
            model = await asyncio.to_thread(registry.get, body.model)
            if not texts or any(not t for t in texts):
                raise BadRequest("input must be a non-empty string or list of non-empty strings", "Send text to embed.")
            for t in texts:
                n = model.count_tokens(t)
                if n > model.backend.context_length:
                    raise PromptTooLong(f"input is {n} tokens, but {name}'s context window is {model.backend.context_length} tokens", "Embed shorter texts.")
            vectors = await asyncio.to_thread(model.backend.embed, texts)
        tokens = sum(model.count_tokens(t) for t in texts)
        return {"object": "list", "model": name, "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app
