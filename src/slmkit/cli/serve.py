"""`slmkit serve`: the OpenAI-compatible server (continuous batching, prefix cache, metrics, web chat page)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.cli.common import err_console, handle_errors, model_or_default
from slmkit.engine.llamacpp_batch import DEFAULT_CONTEXT
from slmkit.engine.scheduler import MAX_BATCH, MAX_QUEUE, PREFIX_CACHE_TOKENS
from slmkit.errors import SlmkitError
from slmkit.config import settings
from slmkit.route.ab import parse_split
from slmkit.route.cache import CACHE_ENTRIES, CACHE_TTL_S, ResponseCache
from slmkit.serve.hybrid import ESCALATION_LOG_ROWS, EscalationLog
from slmkit.serve.limits import MAX_TOKENS_LIMIT


@handle_errors
def serve(
    models: Annotated[list[str] | None, typer.Argument(help="Models to serve (default: the embedded default). Loaded on first use.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SLMKIT_API_KEY", help="Require Authorization: Bearer KEY on /v1, /api and /metrics (checked before a body is read).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most sequences decoded together per model.")] = MAX_BATCH,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Most requests waiting per model; beyond, 429.")] = MAX_QUEUE,
    max_queue_per_client: Annotated[int | None, typer.Option("--max-queue-per-client", help="Most requests one client (address) may have waiting; beyond, 429 for that client only. [default: half of --max-queue]")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Largest max_tokens a request may ask for (and the default).")] = MAX_TOKENS_LIMIT,
    prefix_cache_tokens: Annotated[int, typer.Option("--prefix-cache-tokens", help="Prompt tokens of KV kept for reuse; 0 turns it off.")] = PREFIX_CACHE_TOKENS,
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto (llama.cpp where the model has a GGUF, else PyTorch), llamacpp or torch.")] = "auto",
    context: Annotated[int | None, typer.Option("--context", help=f"llama.cpp: tokens per batch slot; its KV is allocated up front, --max-batch x this. [default: {DEFAULT_CONTEXT}, or the model's context if smaller]")] = None,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="Seconds to let running requests finish on shutdown.")] = 10.0,
    ab: Annotated[list[str] | None, typer.Option("--ab", help="An A/B split served as one name: NAME=MODEL:SHARE,MODEL:SHARE (arms must be served; sticky per request `user`). Repeatable.")] = None,
    cache: Annotated[bool, typer.Option("--cache", help="Answer repeated requests from a response cache (greedy or seeded requests only, unless --cache-sampled).")] = False,
    cache_similarity: Annotated[float | None, typer.Option("--cache-similarity", help="Also match a last message whose embedding has at least this cosine similarity (0.95); implies --cache.")] = None,
    cache_size: Annotated[int, typer.Option("--cache-size", help="Most answers the cache holds per model (least recently used go first).")] = CACHE_ENTRIES,
    cache_ttl: Annotated[float, typer.Option("--cache-ttl", help="Seconds a cached answer stays valid.")] = CACHE_TTL_S,
    cache_sampled: Annotated[bool, typer.Option("--cache-sampled", help="Cache sampled requests too.")] = False,
    small_only: Annotated[bool, typer.Option("--small-only", help="Routers answer with the small model only (decisions are still logged).")] = False,
    large_key: Annotated[str | None, typer.Option("--large-key", envvar="SLMKIT_LARGE_API_KEY", help="API key for routers' large endpoints.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", help="Let browser pages from this origin call the API (for example http://localhost:3000, or * for any). Repeatable.")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="Serve the API's description at /docs and /openapi.json (off: it tells anyone what the server takes).")] = False,
    speculative: Annotated[int, typer.Option("--speculative", min=0, max=16, help="Speculative decoding by prompt lookup for requests that do not say (OpenAI's requests may send `speculative`: N drafted tokens, 0 off): drafts checked with the batch's step on the PyTorch engine's kernels, paused per request where they do not pay; acceptance in /metrics.")] = 0,
    open_metrics: Annotated[bool, typer.Option("--open-metrics", help="Serve /metrics without the API key (with --api-key it needs the key).")] = False,
    allow_model_changes: Annotated[bool, typer.Option("--allow-model-changes", help="Let Ollama's clients pull, create, copy and delete models in the store (/api/pull, /api/create, /api/copy, /api/delete; allowed anyway with --api-key).")] = False,
    escalation_log: Annotated[Path | None, typer.Option("--escalation-log", help="Keep the prompts routers escalate and the large model's answers here (JSON lines; off by default: it holds users' text), for `slmkit route harvest`.")] = None,
    escalation_log_rows: Annotated[int, typer.Option("--escalation-log-rows", help="Most escalations kept (the oldest go first).")] = ESCALATION_LOG_ROWS,
    decision_log: Annotated[Path | None, typer.Option("--decision-log", help="Routers' decisions as JSON lines. [default: SLMKIT_HOME/logs/route-decisions.jsonl]")] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API, with a chat page at /."""
    import uvicorn

    from slmkit.serve.app import create_app
    from slmkit.serve.metrics import Metrics
    from slmkit.serve.registry import ModelRegistry

    if max_batch < 1 or max_queue < 0 or max_tokens < 1 or (context is not None and context < 16):
        raise SlmkitError("--max-batch and --max-tokens must be >= 1, --max-queue >= 0, --context >= 16", "Fix the values.")
    names = [model_or_default(m) for m in models or [None]]
    splits = [parse_split(a) for a in ab or []]
    make_cache = None
    if cache or cache_similarity is not None:
        ResponseCache(cache_size, cache_ttl, cache_similarity)  # bad sizes fail here, before anything loads
        make_cache = lambda: ResponseCache(cache_size, cache_ttl, cache_similarity)  # noqa: E731
    metrics = Metrics()
    registry = ModelRegistry(names, metrics, max_batch=max_batch, max_queue=max_queue, prefix_cache_tokens=prefix_cache_tokens,
                             backend=backend, context=context, splits=splits, cache=make_cache, cache_sampled=cache_sampled,
                             small_only=small_only, large_key=large_key, max_queue_per_client=max_queue_per_client,
                             decision_log=decision_log or settings().home / "logs" / "route-decisions.jsonl",
                             escalation_log=EscalationLog(escalation_log, escalation_log_rows) if escalation_log else None)
    app = create_app(registry, metrics, api_key=api_key, max_tokens_limit=max_tokens, shutdown_timeout=shutdown_timeout,
                     cors_origins=list(cors_origin or []), docs=docs, open_metrics=open_metrics, allow_model_changes=allow_model_changes,
                     speculative=speculative)
    where = f"http://{host}:{port}"
    engines = ", ".join(f"{n} ({registry.backends[n]})" if n in registry.backends else
                        f"{n} (router: {registry.routers[n]['small']} -> {registry.routers[n]['large'].get('store') or registry.routers[n]['large'].get('url')})"
                        if n in registry.routers else f"{n} (A/B split)" for n in registry.names)
    err_console().print(f"Serving {engines} at {where}  (chat page: {where}/, API: {where}/v1, metrics: {where}/metrics)")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console().print("[yellow]warning:[/] listening beyond this machine without --api-key"
                            + (f", and keeping escalated prompts in {escalation_log}: anyone who can reach it fills that file" if escalation_log else ""))
    if escalation_log:
        err_console().print(f"Escalated prompts and the large model's answers are kept in {escalation_log} (at most {escalation_log_rows}).")
    import logging

    access = logging.getLogger("slmkit.access")  # one JSON line per API request on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    route_log = logging.getLogger("slmkit.route")  # drift warnings
    route_log.addHandler(handler)
    route_log.setLevel(logging.INFO)
    route_log.propagate = False
    import sys

    from slmkit.serve.streaming import GIL_SWITCH_INTERVAL_S

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the scheduler's thread gets the GIL back sooner (see there)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(shutdown_timeout) + 1)


@handle_errors
def ps(
    url: Annotated[str, typer.Option("--url", help="The running server.")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SLMKIT_API_KEY", help="The server's API key, if it has one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON.")] = False,
) -> None:
    """The models a running `slmkit serve` has loaded, with what it offers."""
    import json
    import urllib.error
    import urllib.request

    from rich.table import Table

    from slmkit.card import human_bytes
    from slmkit.cli.common import out_console

    def get(path: str) -> dict:
        req = urllib.request.Request(url.rstrip("/") + path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SlmkitError(f"no slmkit server answers at {url}: {exc}", "Start one with slmkit serve, or give its address with --url.") from exc

    loaded, health = get("/api/ps"), get("/health")
    if as_json:
        typer.echo(json.dumps({"offered": health.get("models", []), "loaded": loaded["models"]}, indent=2))
        return
    table = Table(title=f"{url}: {len(loaded['models'])} of {len(health.get('models', []))} offered models loaded")
    for col in ("NAME", "PARAMS", "FORMAT", "SIZE"):
        table.add_column(col)
    for m in loaded["models"]:
        d = m.get("details") or {}
        table.add_row(m["model"].removesuffix(":latest"), d.get("parameter_size", ""), d.get("format", ""), human_bytes(m.get("size") or 0))
    out_console().print(table)
