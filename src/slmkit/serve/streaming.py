"""Generations running beside the event loop, and how their text reaches the client.

Each choice is read in its own thread from a Model's Generation (whose backend is a continuous-batching
scheduler); pieces arrive on an asyncio queue, so the event loop only moves text. Closing a choice cancels its
request in the scheduler and frees the batch slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from slmkit.model import Generation
from slmkit.serve.errors import to_http
from slmkit.serve.metrics import Metrics

DONE = object()

# How long a Python thread may hold the GIL while another waits for it (Python's default: 5 ms). A served step
# releases the GIL at every torch op, and a request's reader thread (detokenizing) can then keep it for the whole
# interval while the scheduler waits; at 16 streams on 2 cores, 0.5 ms measured 6% more tokens/s (268-278 -> 288-293,
# ITL p50 53-56 -> 51-52 ms, w8a8 default model). Set by `slmkit serve` for its process.
GIL_SWITCH_INTERVAL_S = 0.0005


class Choice:
    """One generation running in a reader thread; pieces arrive on an asyncio queue."""

    def __init__(self, index: int, gen: Generation, loop: asyncio.AbstractEventLoop) -> None:
        self.index, self.gen = index, gen
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stop = threading.Event()
        self._loop = loop
        # the reader runs in this request's context: the scheduler reads who sent it (scheduler.CLIENT)
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._read,), daemon=True)
        self.thread.start()

    def _read(self) -> None:
        push: Callable[[Any], None] = lambda item: self._loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        try:
            for piece in self.gen:
                push(piece)
                if self.stop.is_set():
                    break
        except BaseException as exc:
            push(exc)
        finally:
            self.gen.close()  # cancels the request in the scheduler: its batch slot is freed
            push(DONE)


def stop_all(choices: list[Choice]) -> None:
    for c in choices:
        c.stop.set()


async def first_items(choices: list[Choice]) -> list[Any]:
    """Wait for each choice's first item, so queue-full and other errors become HTTP errors before streaming."""
    firsts = [await c.queue.get() for c in choices]
    for item in firsts:
        if isinstance(item, BaseException):
            stop_all(choices)
            raise to_http(item)
    return firsts


async def _watch_disconnect(request: Request, choices: list[Choice]) -> None:
    while not all(c.stop.is_set() for c in choices):
        if await request.is_disconnected():
            stop_all(choices)
            return
        await asyncio.sleep(0.1)


async def collect(request: Request, choices: list[Choice], firsts: list[Any]) -> list[str]:
    """The whole text of every choice (a client that goes away stops them all)."""
    watcher = asyncio.create_task(_watch_disconnect(request, choices))
    try:
        texts = []
        for c, first in zip(choices, firsts):
            item = first
            while item is not DONE:
                if isinstance(item, BaseException):
                    raise to_http(item)
                item = await c.queue.get()
            texts.append(c.gen.text)
        return texts
    finally:
        stop_all(choices)
        watcher.cancel()


ACCESS = logging.getLogger("slmkit.access")


def account(metrics: Metrics, model: str, choices: list[Choice], request_id: str = "") -> None:
    """Count the tokens of a finished request, and log them on the access log under the request's id."""
    prompt = sum(c.gen.stats.prompt_tokens for c in choices)
    completion = sum(c.gen.stats.completion_tokens for c in choices)
    metrics.prompt_tokens.labels(model).inc(prompt)
    metrics.completion_tokens.labels(model).inc(completion)
    line = {"request": request_id, "done": True, "prompt_tokens": prompt, "completion_tokens": completion,
            "finish": [c.gen.stats.finish_reason for c in choices]}
    checks = sum(c.gen.stats.checks for c in choices)
    if checks:
        drafted = sum(c.gen.stats.drafted_tokens for c in choices)
        accepted = sum(c.gen.stats.accepted_tokens for c in choices)
        metrics.speculative_checks.labels(model).inc(checks)
        metrics.speculative_drafted.labels(model).inc(drafted)
        metrics.speculative_accepted.labels(model).inc(accepted)
        line["speculative"] = {"checks": checks, "drafted": drafted, "accepted": accepted}
    ACCESS.info(json.dumps(line))


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def sse_events(choices: list[Choice], firsts: list[Any], model: str, metrics: Metrics,
                     chunk: Callable[[int, str | None, str | None], dict], request_id: str = "",
                     final: Callable[[], dict] | None = None) -> AsyncIterator[bytes]:
    """Server-sent events for every choice, interleaved as pieces come: `chunk(index, text, finish)` builds one
    (text None: the opening chunk; finish set: the closing one), then `final()` if given (the usage chunk), then
    `[DONE]`."""
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(c: Choice, first: Any) -> None:
        item = first
        while True:
            await merged.put((c.index, item))
            if item is DONE:
                return
            item = await c.queue.get()

    tasks = [asyncio.create_task(pump(c, f)) for c, f in zip(choices, firsts)]
    done, last = 0, time.perf_counter()
    try:
        for c in choices:
            yield sse(chunk(c.index, None, None))  # role first, as OpenAI does
        while done < len(choices):
            index, item = await merged.get()
            if item is DONE:
                done += 1
                yield sse(chunk(index, "", choices[index].gen.stats.finish_reason or "stop"))
                continue
            if isinstance(item, BaseException):
                yield sse(to_http(item).body)
                continue
            now = time.perf_counter()
            metrics.itl.labels(model).observe(now - last)
            last = now
            yield sse(chunk(index, item, None))
        if final is not None:
            yield sse(final())
        yield b"data: [DONE]\n\n"
    finally:  # the client went away or the stream ended: stop every generation, free the slots
        stop_all(choices)
        for t in tasks:
            t.cancel()
        account(metrics, model, choices, request_id)
