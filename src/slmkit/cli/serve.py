"""`slmkit serve`: the OpenAI-compatible server (continuous batching, prefix cache, metrics, web chat page)."""

from __future__ import annotations

from typing import Annotated

import typer

from slmkit.cli.common import err_console, handle_errors
from slmkit.engine.llamacpp_batch import DEFAULT_CONTEXT
from slmkit.engine.scheduler import MAX_BATCH, MAX_QUEUE, PREFIX_CACHE_TOKENS
from slmkit.errors import SlmkitError
from slmkit.serve.limits import MAX_TOKENS_LIMIT


@handle_errors
def serve(
    models: Annotated[list[str] | None, typer.Argument(help="Models to serve (default: the embedded default). Loaded on first use.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SLMKIT_API_KEY", help="Require Authorization: Bearer KEY on /v1 routes.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most sequences decoded together per model.")] = MAX_BATCH,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Most requests waiting per model; beyond, 429.")] = MAX_QUEUE,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Largest max_tokens a request may ask for (and the default).")] = MAX_TOKENS_LIMIT,
    prefix_cache_tokens: Annotated[int, typer.Option("--prefix-cache-tokens", help="Prompt tokens of KV kept for reuse; 0 turns it off.")] = PREFIX_CACHE_TOKENS,
    backend: Annotated[str, typer.Option("--backend", "-b", help="auto (llama.cpp where the model has a GGUF, else PyTorch), llamacpp or torch.")] = "auto",
    context: Annotated[int | None, typer.Option("--context", help=f"llama.cpp: tokens per batch slot; its KV is allocated up front, --max-batch x this. [default: {DEFAULT_CONTEXT}, or the model's context if smaller]")] = None,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="Seconds to let running requests finish on shutdown.")] = 10.0,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API, with a chat page at /."""
    import uvicorn

    from slmkit.serve.app import create_app
    from slmkit.serve.metrics import Metrics
    from slmkit.serve.registry import ModelRegistry
    from slmkit.sources.importer import ensure_default

    if max_batch < 1 or max_queue < 0 or max_tokens < 1 or (context is not None and context < 16):
        raise SlmkitError("--max-batch and --max-tokens must be >= 1, --max-queue >= 0, --context >= 16", "Fix the values.")
    names = list(models or []) or [ensure_default()]
    metrics = Metrics()
    registry = ModelRegistry(names, metrics, max_batch=max_batch, max_queue=max_queue, prefix_cache_tokens=prefix_cache_tokens,
                             backend=backend, context=context)
    app = create_app(registry, metrics, api_key=api_key, max_tokens_limit=max_tokens, shutdown_timeout=shutdown_timeout)
    where = f"http://{host}:{port}"
    engines = ", ".join(f"{n} ({registry.backends[n]})" for n in registry.names)
    err_console().print(f"Serving {engines} at {where}  (chat page: {where}/, API: {where}/v1, metrics: {where}/metrics)")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console().print("[yellow]warning:[/] listening beyond this machine without --api-key")
    import logging

    access = logging.getLogger("slmkit.access")  # one JSON line per API request on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(shutdown_timeout) + 1)
