"""Ollama's native API beside the OpenAI one, so clients that speak it (Open WebUI's Ollama connection, Continue's
ollama provider, the `ollama` Python and JS packages, editor plugins) connect unmodified: /api/tags, /api/ps,
/api/show, /api/version, /api/chat, /api/generate, /api/embed and the older /api/embeddings, streamed as JSON lines as Ollama does; an empty
prompt (or no messages) loads a model, and with keep_alive 0 frees it, as Ollama's clients ask; a timed keep_alive
frees it once idle after that time.

The same models, schedulers, metrics and limits as the OpenAI routes; conversions live in ollama_compat.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from slmkit.serve import ollama_compat as ol
from slmkit.sources import modelfile
from slmkit.sources.modelfile import PRESET_KEY
from slmkit.serve import tools as tl
from slmkit.serve.errors import to_http
from slmkit.serve.registry import BadRequest
from slmkit.serve.routes import Server, embed_checked, identify
from slmkit.serve.streaming import DONE, Choice, account, collect, first_items, stop_all
from slmkit.version import __version__


def ollama_error(exc: BaseException) -> JSONResponse:
    """Ollama's error shape: {"error": "message"} with the status the OpenAI routes would give."""
    err = to_http(exc)
    e = err.body.get("error")
    return JSONResponse({"error": e.get("message") if isinstance(e, dict) else str(e)}, status_code=err.status, headers=err.headers)


def lines_of(objs: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Objects as Ollama's stream of JSON lines."""
    async def gen() -> AsyncIterator[bytes]:
        for obj in objs:
            yield (json.dumps(obj) + "\n").encode()
    return gen()


class OllamaApi:
    """Ollama's endpoints of one server, a method each (ollama_routes mounts them)."""

    def __init__(self, server: Server) -> None:
        self.server, self.registry, self.metrics = server, server.registry, server.metrics

    def card_of(self, name: str) -> Any:  # A/B splits have no card
        return self.registry.store.card(name) if self.registry.store.exists(name) else None

    async def version(self) -> dict[str, str]:
        return {"version": __version__}

    async def tags(self) -> dict[str, Any]:
        r = self.registry
        return {"models": [ol.tag_entry(n, self.card_of(n), r.backends.get(n)) for n in r.names]}

    async def ps(self) -> dict[str, Any]:
        # loaded models stay until the server stops, unless a request's keep_alive set a time
        r = self.registry
        return {"models": [{**ol.tag_entry(n, self.card_of(n), r.backends.get(n)), "expires_at": ol.iso_time(r.expires_at(n)),
                            "size_vram": 0} for n in r.loaded()]}

    async def show(self, body: ol.ShowRequest) -> Any:
        name = ol.model_name(body.model or body.name or "")
        if name not in self.registry.names:
            return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)
        card = self.card_of(name)
        info = {"general.architecture": card.model_type, "general.parameter_count": card.parameters,
                f"{card.model_type}.context_length": card.context_length} if card else {}
        preset = (card.settings.get(PRESET_KEY) or {}) if card else {}
        made = modelfile.to_text(name, preset)  # the Modelfile that makes it again
        return {"license": preset.get("license", ""), "modelfile": made, "system": preset.get("system", ""),
                "parameters": "\n".join(x.removeprefix("PARAMETER ") for x in made.splitlines() if x.startswith("PARAMETER ")),
                "template": "", "details": ol.details(card, self.registry.backends.get(name)),
                "model_info": info, "capabilities": ol.capabilities(self.registry.store.path(name) if card else None),
                "modified_at": (card.created if card else "") or ol.now()}

    async def load_or_unload(self, body: ol._Base, piece: dict[str, Any]) -> Any:
        """Ollama's calls with nothing to answer (an empty prompt, no messages): load the model, or with keep_alive
        0 free it; answered at once with done_reason "load" / "unload"."""
        name, r = ol.model_name(body.model), self.registry
        try:
            unload = ol.unloads(body.keep_alive)
            if not unload or name not in r.names:
                await asyncio.to_thread(r.get, name)  # loads it (or answers that no such model is served)
            if unload:
                await asyncio.to_thread(r.unload, name)
            else:
                r.keep(name, ol.keep_alive_seconds(body.keep_alive))
        except Exception as exc:
            return ollama_error(exc)
        return {"model": name + ol.TAG, "created_at": ol.now(), **piece, "done": True, "done_reason": "unload" if unload else "load"}

    async def generate(self, endpoint: str, body: ol._Base, request: Request, make: Callable[[Any, dict[str, Any]], Any],
                       piece: Callable[[str, str], dict[str, Any]]) -> Any:
        """The skeleton chat and generate share: the model (kept alive as asked), one choice, its first piece (a
        refusal is an error), then the whole answer or a stream of JSON lines ending in the final fields."""
        name, metrics = ol.model_name(body.model), self.metrics
        label = name if name in self.registry.names else "unknown"
        t0 = time.perf_counter()
        try:
            kw = ol.sampling(body)
            limit = self.server.max_tokens_limit
            if kw.get("max_tokens", 0) > limit:
                raise BadRequest(f"num_predict {kw['max_tokens']} is over this server's limit of {limit}", "Ask for fewer tokens.")
            kw.setdefault("max_tokens", limit)
            kw.setdefault("speculative", self.server.speculative)
            keep = ol.keep_alive_seconds(body.keep_alive)
            model = await asyncio.to_thread(self.registry.get, name)
            self.registry.keep(name, keep)
            loop = asyncio.get_running_loop()
            choice = await asyncio.to_thread(lambda: Choice(0, make(model, kw), loop))
            first = (await first_items([choice]))[0]
        except Exception as exc:
            metrics.requests.labels(endpoint, label, str(to_http(exc).status)).inc()
            return ollama_error(exc)
        metrics.requests.labels(endpoint, name, "200").inc()
        metrics.ttft.labels(name).observe(time.perf_counter() - t0)
        tag = name + ol.TAG

        def final() -> dict[str, Any]:
            return {"model": tag, "created_at": ol.now(), **piece("", ""),
                    **ol.final_fields(choice.gen.stats, int((time.perf_counter() - t0) * 1e9))}

        if not body.stream:
            try:
                text = (await collect(request, [choice], [first]))[0]
            except Exception as exc:
                return ollama_error(exc)
            account(metrics, name, [choice])
            return {**final(), **piece(text, "")}

        async def lines() -> AsyncIterator[bytes]:
            item = first
            try:
                while item is not DONE:
                    if isinstance(item, BaseException):
                        yield (json.dumps({"error": str(item)}) + "\n").encode()
                        return
                    yield (json.dumps({"model": tag, "created_at": ol.now(), **piece(item, ""), "done": False}) + "\n").encode()
                    item = await choice.queue.get()
                yield (json.dumps(final()) + "\n").encode()
            finally:
                stop_all([choice])
                account(metrics, name, [choice])

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def chat(self, body: ol.ChatRequest, request: Request) -> Any:
        if not body.messages:
            return await self.load_or_unload(body, {"message": {"role": "assistant", "content": ""}})
        try:
            tools = tl.check_tools(body.tools)
        except Exception as exc:
            return ollama_error(exc)
        message = lambda text, _: {"message": {"role": "assistant", "content": text}}  # noqa: E731
        after = bool(body.messages) and body.messages[-1].role == "tool"
        calling: dict[str, Any] = {}  # the template's tool-call family and the mode, once the model is known

        def make(model: Any, kw: dict[str, Any]) -> Any:
            one = model.single if tools else None
            fam = tl.family_of(one.backend.chat_template) if one is not None else None
            # after a result, the text protocol answers in text; a template with a tools section decides as taught
            mode = calling["mode"] = tl.mode_of(None, tools, after_result=after and fam is None)
            calling["family"] = fam
            if fam:  # the template renders the tools, earlier calls and results
                return model.stream_chat(ol.chat_messages(body, native=True), tools=tl.openai_tools(tools), **kw)
            return model.stream_chat(tl.with_tools(ol.chat_messages(body), tools, mode), **kw)

        if not tools:
            return await self.generate("ollama_chat", body, request, make, message)
        # with tools, an answer is a call or text only once it is whole (as on /v1): generate, then send what it is
        whole = await self.generate("ollama_chat", body.model_copy(update={"stream": False}), request, make, message)
        if not isinstance(whole, dict):
            return whole  # an error
        content, calls = tl.calls_in(whole["message"]["content"], tools, calling.get("mode"), calling.get("family"))
        if calls:
            whole["message"] = {"role": "assistant", "content": content, "tool_calls": [ol.tool_call(c) for c in calls]}
        if not body.stream:
            return whole
        return StreamingResponse(lines_of([{"model": whole["model"], "created_at": whole["created_at"], "message": whole["message"], "done": False},
                                           {**whole, "message": {"role": "assistant", "content": ""}}]), media_type="application/x-ndjson")

    async def generate_route(self, body: ol.GenerateRequest, request: Request) -> Any:
        if not body.prompt and not body.images:
            return await self.load_or_unload(body, {"response": ""})

        def make(model: Any, kw: dict[str, Any]) -> Any:
            if body.images:
                raise ol.Unsupported("images: the models served here read text only", "Send text only.")
            if body.raw:
                return model.stream(body.prompt, **kw)
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": body.prompt}]
            return model.stream_chat(msgs, **kw)

        return await self.generate("ollama_generate", body, request, make, lambda text, _: {"response": text})

    async def embed(self, body: ol.EmbedRequest) -> Any:
        name = ol.model_name(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        t0 = time.perf_counter()
        try:
            keep = ol.keep_alive_seconds(body.keep_alive)
            model = await asyncio.to_thread(self.registry.get, name)
            self.registry.keep(name, keep)
            vectors, tokens = await embed_checked(model, name, texts)
        except Exception as exc:
            return ollama_error(exc)
        return {"model": name + ol.TAG, "embeddings": vectors, "total_duration": int((time.perf_counter() - t0) * 1e9),
                "load_duration": 0, "prompt_eval_count": tokens}

    async def embeddings_legacy(self, body: ol.LegacyEmbedRequest) -> Any:  # Ollama's older route: one prompt, one vector
        name = ol.model_name(body.model)
        try:
            model = await asyncio.to_thread(self.registry.get, name)
            vectors, _ = await embed_checked(model, name, [body.prompt])
        except Exception as exc:
            return ollama_error(exc)
        return {"embedding": vectors[0]}


def ollama_routes(server: Server) -> APIRouter:
    """Ollama's endpoints, one method of OllamaApi each, behind the client's identity."""
    api = OllamaApi(server)
    router = APIRouter(dependencies=[Depends(identify)])  # the API key: app.Boundary
    router.get("/api/version")(api.version)
    router.get("/api/tags")(api.tags)
    router.get("/api/ps")(api.ps)
    router.post("/api/show")(api.show)
    router.post("/api/chat")(api.chat)
    router.post("/api/generate")(api.generate_route)
    router.post("/api/embed")(api.embed)
    router.post("/api/embeddings")(api.embeddings_legacy)
    return router
