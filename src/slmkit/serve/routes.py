"""The OpenAI-compatible routes (/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings), and slmkit's
/v1/classify (a classifier's labels, or any labels a request names, scored by the model).

Chat and completions share one skeleton (`OpenAIApi.generate`, with a ChatCall or CompletionCall that renders the
request, its chunks and its response): pick the model, start a reader thread per choice, wait
for the first pieces (so refusals are HTTP errors), then stream server-sent events or collect the texts. Wire
objects are built by the pure conversions in openai_compat.py; failures become OpenAI error bodies (errors.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from slmkit.engine.scheduler import CLIENT
from slmkit.data.classify import label_schema, task_of
from slmkit.errors import ModelNotFound, PromptTooLong
from slmkit.model import Generation, Model, Servable
from slmkit.serve import openai_compat as oa
from slmkit.serve import tools as tl
from slmkit.serve.errors import to_http
from slmkit.serve.limits import MAX_CLASSIFY_INPUTS, MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_TOKENS
from slmkit.serve.metrics import Metrics
from slmkit.serve.registry import BadRequest, ModelRegistry, check_inputs
from slmkit.serve.streaming import ACCESS, Choice, account, collect, first_items, sse, sse_events


async def embed_checked(model: Servable, name: str, texts: list[str | list[int]]) -> tuple[list[list[float]], int]:
    """Embeddings of a request's texts (or lists of token ids, each in the vocabulary) within the server's limits
    (count, each input's length, all tokens): the vectors and the tokens they took. For the OpenAI and Ollama
    embedding routes alike."""
    check_inputs(texts, MAX_EMBEDDING_INPUTS, "embed")
    if model.single is None and any(not isinstance(t, str) for t in texts):
        raise BadRequest(f"{name} is routed: token ids need one model's vocabulary", "Send text, or name a model.")
    counts = await asyncio.to_thread(lambda: [model.count_tokens(t) if isinstance(t, str) else len(model.single.checked_token_ids(t))
                                              for t in texts])
    if max(counts) > model.backend.context_length:
        raise PromptTooLong(f"an input is {max(counts)} tokens, but {name}'s context window is {model.backend.context_length} tokens",
                            "Embed shorter texts.")
    if sum(counts) > MAX_EMBEDDING_TOKENS:
        raise BadRequest(f"the inputs hold {sum(counts)} tokens, over this server's limit of {MAX_EMBEDDING_TOKENS} per request",
                         "Send them in several requests.")
    return await asyncio.to_thread(model.backend.embed, texts), sum(counts)


@dataclass(frozen=True)
class Server:
    """What the routes share: the models, the metrics and the limits of one server."""

    registry: ModelRegistry
    metrics: Metrics
    max_tokens_limit: int
    allow_changes: bool = False  # Ollama's pull, create, copy, delete (serve/ollama_manage.py)
    speculative: int = 0  # drafted tokens checked per step for requests that do not say (slmkit serve --speculative)
    started: int = field(default_factory=lambda: int(time.time()))  # `created` of the served models


def logprobs_of(model: Servable, gen: Generation) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
    """The generated tokens' log-probabilities under the model (before sampling filters) and the top ones, as
    the decode loop computed them while generating (EOS left out)."""
    b = model.backend
    steps = [s for s in gen.steps if s.token not in b.eos_token_ids]
    return ([b.decode([s.token]) for s in steps], [s.logprob for s in steps],
            [[(b.decode([t]), lp) for t, lp in s.top] for s in steps])


async def replay_chat(whole: dict[str, Any], usage_chunk: bool) -> AsyncIterator[bytes]:
    """A finished chat completion as the chunks a stream of it would have had (a tool call as one delta)."""
    rid, name = whole["id"], whole["model"]
    for c in whole["choices"]:
        msg = c["message"]
        yield sse(oa.chat_chunk(rid, name, c["index"], {"role": "assistant", "content": ""}, None))
        if msg.get("tool_calls"):
            delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(msg["tool_calls"])]}
            yield sse(oa.chat_chunk(rid, name, c["index"], delta, None))
        elif msg.get("content"):
            yield sse(oa.chat_chunk(rid, name, c["index"], {"content": msg["content"]}, None))
        yield sse(oa.chat_chunk(rid, name, c["index"], {}, c["finish_reason"]))
    if usage_chunk:
        yield sse(oa.usage_chunk(rid, name, "chat.completion.chunk", whole["usage"]))
    yield b"data: [DONE]\n\n"


def request_usage(choices: list[Choice], endpoint: str, n: int) -> oa.Usage:
    """Prompt tokens once per prompt (chat: one prompt; completions: one per prompt, each with n choices)."""
    prompt = choices[0].gen.stats.prompt_tokens if endpoint == "chat" else sum(c.gen.stats.prompt_tokens for c in choices[::n])
    return oa.usage(prompt, sum(c.gen.stats.completion_tokens for c in choices))


def with_route(response: Any, choices: list[Choice]) -> Any:
    """A routed or cached answer says so in an extension field (`slmkit`): who answered and why, or a cache hit."""
    info = [({"answered_by": o.answered_by, "reason": o.decision.reason if o.decision else None, "fallback": o.error}
             if (o := getattr(c.gen, "outcome", None)) else {}) | ({"cached": True} if getattr(c.gen, "cached", False) else {})
            for c in choices]
    if any(info):
        response["slmkit"] = {"choices": info}
    return response


def with_weights(response: dict[str, Any], model: Servable, choices: list[Choice]) -> dict[str, Any]:
    """A mixture of specialists' domain weights after each choice's text, in the `slmkit` extension field."""
    one = model.single
    weights = [one.domain_weights(c.gen) for c in choices] if one is not None else []
    if any(w is not None for w in weights):
        response.setdefault("slmkit", {})["domain_weights"] = weights
    return response


async def identify(request: Request) -> None:
    """Who sent the request (its address), for the scheduler's per-client share of the queue and of the batch. An
    async dependency: it runs in the request's own context, which the handler and its reader threads inherit."""
    CLIENT.set(request.client.host if request.client else "")


class ChatCall:
    """One /v1/chat/completions request through the shared skeleton: its messages rendered with the tools it
    offers (`begin`, once the model is known), its stream chunks, and its whole response with any tool calls."""

    def __init__(self, api: "OpenAIApi", body: oa.ChatRequest) -> None:
        self.api, self.body = api, body
        self.messages: list[dict[str, str]] = []
        self.tools: Any = None
        self.mode: str | None = None
        self.family: str | None = None

    def begin(self, model: Servable, loop: asyncio.AbstractEventLoop) -> list[Choice]:
        body = self.body
        self.tools = tools = tl.check_tools(body.tools)
        one = model.single if tools else None  # a template's own tool format needs the one model behind the answer
        self.family = family = tl.family_of(one.backend.chat_template) if one is not None else None
        self.mode = mode = tl.mode_of(body.tool_choice, tools, after_result=bool(body.messages) and body.messages[-1].role == "tool"
                                      and family is None)  # a template with a tools section decides after a result as it was taught
        extra: dict[str, Any] = {}
        if family:  # the template renders the tools, earlier calls and results; a required call starts with its marker
            self.messages = oa.plain_messages(body.messages, native=True)
            extra["tools"] = tl.openai_tools(tools)
            if mode not in (None, "none", "auto"):
                extra["prefill"] = tl.CALL_PREFIX[family]
        else:  # content parts joined; earlier calls and results in the tool protocol; the tools in the system message
            self.messages = tl.with_tools(oa.plain_messages(body.messages), tools, mode)
        if mode not in (None, "none", "auto"):  # a call is required: its JSON is enforced by grammar
            schema = tl.call_schema(tools, mode, family)
            extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "call", "schema": schema}}
        return self.api.start(model, body, lambda kw: model.stream_chat(self.messages, **{**kw, **extra}), loop)

    def chunk(self, rid: str, name: str, i: int, text: str | None, finish: str | None) -> dict:
        delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
        return oa.chat_chunk(rid, name, i, delta, finish)

    def respond(self, rid: str, name: str, model: Servable, choices: list[Choice], texts: list[str]) -> dict:
        out = []
        for c, text in zip(choices, texts):
            content, calls = tl.calls_in(text, self.tools, self.mode, self.family)
            choice = oa.chat_choice(c.index, text, "tool_calls" if calls else c.gen.stats.finish_reason,
                                    oa.chat_logprobs(*logprobs_of(model, c.gen)) if self.body.logprobs else None)
            if calls:
                choice["message"] = {"role": "assistant", "content": content or None, "tool_calls": calls}
            out.append(choice)
        return with_weights(with_route(oa.chat_response(rid, name, out, request_usage(choices, "chat", self.body.n)), choices), model, choices)


class CompletionCall:
    """One /v1/completions request: every prompt with its n choices, numbered in order."""

    def __init__(self, api: "OpenAIApi", body: oa.CompletionRequest) -> None:
        self.api, self.body = api, body
        self.prompts = oa.prompt_list(body.prompt)

    def begin(self, model: Servable, loop: asyncio.AbstractEventLoop) -> list[Choice]:
        if not self.prompts or any(not p for p in self.prompts):
            raise BadRequest("prompt is empty", "Send a prompt string (or token ids).")
        if model.single is None and any(not isinstance(p, str) for p in self.prompts):
            raise BadRequest("token-id prompts need one served model, not a routed name", "Send text.")
        choices: list[Choice] = []
        for p in self.prompts:
            for c in self.api.start(model, self.body, lambda kw, p=p: model.stream(p, **kw), loop):
                c.index = len(choices)
                choices.append(c)
        return choices

    def chunk(self, rid: str, name: str, i: int, text: str | None, finish: str | None) -> dict:
        return oa.completion_chunk(rid, name, i, text or "", finish)

    def respond(self, rid: str, name: str, model: Servable, choices: list[Choice], texts: list[str]) -> dict:
        out = [oa.completion_choice(c.index, text, c.gen.stats.finish_reason,
                                    oa.completion_logprobs(*logprobs_of(model, c.gen)) if self.body.logprobs is not None else None)
               for c, text in zip(choices, texts)]
        return with_weights(with_route(oa.completion_response(rid, name, out, request_usage(choices, "completions", self.body.n)), choices),
                            model, choices)


class OpenAIApi:
    """The OpenAI-compatible endpoints of one server, a method each (openai_routes mounts them)."""

    def __init__(self, server: Server) -> None:
        self.server, self.registry, self.metrics = server, server.registry, server.metrics

    @asynccontextmanager
    async def counted(self, endpoint: str, model: str) -> AsyncIterator[str]:
        """Count the request by outcome; any failure becomes its HTTP error in OpenAI's format. Labels come from the
        served models only: any other name a client sends is counted as "unknown"."""
        model = model if model in self.registry.names else "unknown"
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex[:16]

        def log(status: int, error: str | None = None) -> None:  # one JSON line per request; never the prompt text
            ACCESS.info(json.dumps({"request": rid, "endpoint": endpoint, "model": model, "status": status,
                                    "ms": round(1000 * (time.perf_counter() - t0), 1), **({"error": error[:200]} if error else {})}))

        try:
            yield rid
        except Exception as exc:
            err = to_http(exc)
            self.metrics.requests.labels(endpoint, model, str(err.status)).inc()
            log(err.status, str(err.body.get("error", {}).get("message", "")))
            raise err from None
        self.metrics.requests.labels(endpoint, model, "200").inc()
        log(200)

    def start(self, model: Servable, body: oa._Sampling, make: Callable[[dict[str, Any]], Generation],
              loop: asyncio.AbstractEventLoop) -> list[Choice]:
        """Render, tokenize and submit every choice (run in a worker thread: none of it on the event loop)."""
        limit = body.max_completion_tokens or body.max_tokens
        if limit is not None and limit > self.server.max_tokens_limit:
            raise BadRequest(f"max_tokens {limit} is over this server's limit of {self.server.max_tokens_limit}", "Ask for fewer tokens.")
        choices = []
        for i in range(body.n):
            kw = oa.sampling_kwargs(body, i)
            kw.setdefault("max_tokens", self.server.max_tokens_limit)
            kw.setdefault("speculative", self.server.speculative)
            choices.append(Choice(i, make(kw), loop))
        return choices

    async def generate(self, endpoint: str, body: oa._Sampling, request: Request, call: ChatCall | CompletionCall) -> Any:
        """The skeleton chat and completions share: pick the model, start the choices, wait for their first pieces
        (a refusal is an HTTP error), then stream or collect."""
        name = body.model or self.registry.names[0]
        t0 = time.perf_counter()
        async with self.counted(endpoint, name) as log_id:
            oa.refused_fields(body)
            model = await asyncio.to_thread(self.registry.get, body.model, body.user)
            if body.stream and body.logprobs:
                raise BadRequest("logprobs are returned only when stream is false", "Drop stream, or logprobs.")
            if body.logprobs and model.single is None:
                raise BadRequest(f"{name} is routed: its answer may come from another model, which gives no logprobs here",
                                 "Ask a model by its own name for logprobs.")
            choices = await asyncio.to_thread(call.begin, model, asyncio.get_running_loop())
            firsts = await first_items(choices)
            self.metrics.ttft.labels(name).observe(time.perf_counter() - t0)
        rid = oa.new_id("chatcmpl" if endpoint == "chat" else "cmpl")
        if body.stream:
            final = None
            if oa.include_usage(body):
                obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
                final = lambda: oa.usage_chunk(rid, name, obj, request_usage(choices, endpoint, body.n))  # noqa: E731
            events = sse_events(choices, firsts, name, self.metrics, lambda i, text, finish: call.chunk(rid, name, i, text, finish), log_id, final)
            return StreamingResponse(events, media_type="text/event-stream")
        texts = await collect(request, choices, firsts)
        account(self.metrics, name, choices, log_id)
        return call.respond(rid, name, model, choices, texts)

    def model_entry(self, n: str) -> dict[str, Any]:
        store = self.registry.store
        task = task_of(store.card(n).settings) if store.exists(n) else None
        return {"id": n, "object": "model", "created": self.server.started, "owned_by": "slmkit",
                **({"labels": task["labels"], "prompt_format": task["prompt_format"],  # and a chat answer held to them:
                    "response_format": {"type": "json_schema", "json_schema": {"name": "label", "schema": label_schema(task["labels"])}}}
                   if task else {})}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_entry(n) for n in self.registry.names]}

    async def get_model(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.registry.names:
            raise to_http(ModelNotFound(f"model {model_id!r} not found", f"Models served: {', '.join(self.registry.names)}"))
        return self.model_entry(model_id)

    async def chat_completions(self, body: oa.ChatRequest, request: Request) -> Any:
        call = ChatCall(self, body)
        if not (body.tools and body.tool_choice != "none"):
            return await self.generate("chat", body, request, call)
        # with tools, an answer is a call or text only once it is whole: generate, then stream what it turned out to be
        whole = await self.generate("chat", body.model_copy(update={"stream": False}), request, call)
        if not body.stream:
            return whole
        return StreamingResponse(replay_chat(whole, oa.include_usage(body)), media_type="text/event-stream")

    async def completions(self, body: oa.CompletionRequest, request: Request) -> Any:
        return await self.generate("completions", body, request, CompletionCall(self, body))

    async def plain_model(self, name: str | None) -> Model:
        """The one model a name serves (a cached name's too); a routed name is refused."""
        one = (await asyncio.to_thread(self.registry.get, name)).single
        if one is None:
            raise BadRequest(f"{name} is routed: its answers may come from another model", "Use a served model's own name.")
        return one

    async def tokenize(self, body: oa.TokenizeRequest) -> Any:  # llama-server's
        async with self.counted("tokenize", body.model or self.registry.names[0]):
            model = await self.plain_model(body.model)
            b = model.backend
            ids = await asyncio.to_thread(b.encode, body.content, add_special_tokens=body.add_special)
        return {"tokens": [{"id": i, "piece": b.decode([i])} for i in ids] if body.with_pieces else ids}

    async def detokenize(self, body: oa.DetokenizeRequest) -> Any:
        async with self.counted("detokenize", body.model or self.registry.names[0]):
            model = await self.plain_model(body.model)
            content = await asyncio.to_thread(model.backend.decode, model.checked_token_ids(body.tokens))
        return {"content": content}

    async def embeddings(self, body: oa.EmbeddingRequest) -> Any:
        name = body.model or self.registry.names[0]
        texts = oa.prompt_list(body.input)
        async with self.counted("embeddings", name):
            model = await asyncio.to_thread(self.registry.get, body.model)
            vectors, tokens = await embed_checked(model, name, texts)
        return {"object": "list", "model": name, "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def classify(self, body: oa.ClassifyRequest) -> Any:
        name = body.model or self.registry.names[0]
        texts = [body.input] if isinstance(body.input, str) else body.input
        async with self.counted("classify", name):
            model = await self.plain_model(body.model)
            check_inputs([t.strip() for t in texts], MAX_CLASSIFY_INPUTS, "classify")
            if body.labels is None and not task_of(model.card.settings if model.card else None):
                raise BadRequest(f"{name} is not a classifier (slmkit finetune --task classify) and the request names no labels",
                                 'Pass "labels": ["a", "b", ...], or serve a classifier.')
            got = await asyncio.to_thread(lambda: [model.classify(t, body.labels) for t in texts])
        tokens = sum(g.prompt_tokens for g in got)
        return {"object": "list", "model": name, "data": [oa.classification(i, g.label, g.probabilities) for i, g in enumerate(got)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def openai_routes(api: OpenAIApi) -> APIRouter:
    """The OpenAI-compatible endpoints, one method of OpenAIApi each, behind the client's identity."""
    router = APIRouter(dependencies=[Depends(identify)])  # the API key: app.Boundary, before the body is read
    router.get("/v1/models")(api.list_models)
    router.get("/v1/models/{model_id:path}")(api.get_model)
    router.post("/v1/chat/completions")(api.chat_completions)
    router.post("/v1/completions")(api.completions)
    router.post("/tokenize")(api.tokenize)
    router.post("/detokenize")(api.detokenize)
    router.post("/v1/embeddings")(api.embeddings)
    router.post("/v1/classify")(api.classify)
    return router
