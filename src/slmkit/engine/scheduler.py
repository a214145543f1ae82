"""Continuous batching for the PyTorch backend: requests join and leave the running batch at every step.

One worker thread owns the model. A new request is prefilled alone (reusing a cached prompt prefix when one
matches), then its KV rows join the running batch; each decode step runs one forward pass for all running
sequences. Finished or cancelled sequences leave at once. Consumers read token ids from a per-request queue.
The batch's KV lives in a batch store: on llama.cpp, one sequence per slot of a multi-sequence context
(`llamacpp_batch.LlamaCppSlots`); on PyTorch, Llama-layout models in a preallocated slot cache (`SlotKV`, the
lean forward of llama_fast) and other models in a left-padded transformers cache (`DynamicKV`).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from slmkit.engine.kv_cache import KV, PrefixCache, cache_from, cut, join_rows, kv_of, select_rows
from slmkit.engine.llama_fast import FastLlama
from slmkit.engine.sampling import SamplingParams, make_generator, sample_next, sample_rows
from slmkit.engine.torch_backend import TorchBackend
from slmkit.errors import SlmkitError

if TYPE_CHECKING:
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.llamacpp_batch import LlamaCppSlots

    Engine = TorchBackend | LlamaCppBackend

_DONE = object()


class QueueFull(SlmkitError):
    """The waiting queue is full: the server answers 429 with Retry-After."""


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    max_new: int
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    history: list[int] = field(default_factory=list)
    produced: int = 0


class BatchScheduler:
    """Runs requests on one backend (PyTorch or llama.cpp) with a shared, continuously changing batch."""

    def __init__(self, backend: "Engine", *, max_batch: int = 16, max_queue: int = 64, prefix_cache_tokens: int = 4096,
                 context: int | None = None) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []
        self.store = batch_store(backend, max_batch, context)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="slmkit-scheduler", daemon=True)
        self._thread.start()

    # ---- public -----------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams, max_new: int) -> _Request:
        with self._cv:
            if self._stopping:
                raise SlmkitError("the server is shutting down", "Retry against a running server.")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)", "Retry in a moment.")
            req = _Request(list(prompt), params, max_new, generator=make_generator(params.seed), history=list(prompt))
            self.waiting.append(req)
            self._cv.notify()
        return req

    def tokens(self, req: _Request) -> Iterator[int]:
        """Token ids of a request as they are made; closing this iterator cancels the request."""
        try:
            while True:
                item = req.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled.set()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting, let running requests finish for up to `timeout` s, then cancel the rest."""
        with self._cv:
            self._stopping = True
            for req in self.waiting:
                req.out.put(SlmkitError("the server shut down before this request started"))
            self.waiting.clear()
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        for req in list(self.running):
            req.cancelled.set()
        with self._cv:
            self._cv.notify()
        self._thread.join(timeout=5)
        if hasattr(self.store, "close") and not self._thread.is_alive():
            self.store.close()

    # ---- worker -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self.running and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.running:
                    return
                admit = []
                while self.waiting and len(self.running) + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
            try:
                for req in admit:
                    if not req.cancelled.is_set():
                        self._prefill(req)
                if self.running:
                    self._step()
            except BaseException as exc:  # a failure ends the affected requests, not the server
                for req in self.running + admit:
                    req.out.put(exc)
                self.running = []
                self.store.clear()

    @torch.inference_mode()
    def _prefill(self, req: _Request) -> None:
        ids = req.prompt
        reused, kv = self.prefix_cache.lookup(ids) if self.prefix_cache else (0, None)
        logits, row_kv = self.store.prefill(ids, reused, kv, export=self.prefix_cache is not None)
        if self.prefix_cache and row_kv is not None:
            self.prefix_cache.store(ids, row_kv)
        if not self._emit(req, sample_next(logits, req.params, req.history, req.generator)):
            return
        self.store.join()
        self.running.append(req)

    def _emit(self, req: _Request, token: int) -> bool:
        """Hand a token to the consumer; False when the request is finished."""
        req.out.put(token)
        req.produced += 1
        req.history.append(token)
        if token in self.backend.eos_token_ids or req.produced >= req.max_new or req.cancelled.is_set():
            req.out.put(_DONE)
            return False
        return True

    @torch.inference_mode()
    def _step(self) -> None:
        run = self.running
        logits = self.store.step([r.history[-1] for r in run])  # (B, V)
        tokens = sample_rows(logits, [r.params for r in run], [r.history for r in run], [r.generator for r in run])
        keep = []
        for i, (req, token) in enumerate(zip(run, tokens)):
            if req.cancelled.is_set():
                req.out.put(_DONE)
                continue
            if self._emit(req, token):
                keep.append(i)
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in self.store.keep(keep)]


def batch_store(backend: "Engine", slots: int, context: int | None = None) -> "SlotKV | DynamicKV | LlamaCppSlots":
    """Where the running batch's KV lives for this backend (`context`: tokens per slot, llama.cpp only)."""
    if getattr(backend, "name", "") == "llamacpp":
        from slmkit.engine.llamacpp_batch import LlamaCppSlots  # llama_cpp is imported only when asked for

        return LlamaCppSlots(backend, slots, context)
    return SlotKV(backend.fast, slots) if backend.fast else DynamicKV(backend)


class SlotKV:
    """The running batch in a preallocated slot cache, stepped by the lean Llama forward (rows 0..n-1 run)."""

    def __init__(self, fast: FastLlama, slots: int) -> None:
        self.fast = fast
        self.cache = fast.new_cache(slots)
        self.rows = 0

    def prefill(self, ids: list[int], reused: int, kv: KV | None, *, export: bool) -> tuple[torch.Tensor, KV | None]:
        """Prefill `ids` (the first `reused` already in `kv`) into the next free slot; its KV copied out if asked."""
        slot = self.rows
        self.cache.load(slot, cut(kv, reused) if kv else [])
        logits = self.fast.forward(self.cache, torch.tensor([ids[reused:]]), first=slot)[0]
        return logits, self.cache.export(slot) if export else None

    def join(self) -> None:
        self.rows += 1

    def step(self, last: list[int]) -> torch.Tensor:
        return self.fast.forward(self.cache, torch.tensor(last, dtype=torch.long)[:, None])

    def keep(self, rows: list[int]) -> list[int]:
        """Keep `rows`, filling each freed slot with the last running row; returns the new order."""
        order = list(range(self.rows))
        for gone in sorted(set(order) - set(rows), reverse=True):
            last = len(order) - 1
            if gone != last:
                self.cache.move(last, gone)
                order[gone] = order[last]
            order.pop()
        self.rows = len(order)
        return order

    def clear(self) -> None:
        self.rows = 0


class DynamicKV:
    """The running batch as a left-padded transformers DynamicCache (any causal LM transformers runs)."""

    def __init__(self, backend: TorchBackend) -> None:
        self.model = backend.model
        self.cache_arg = backend.cache_arg
        self.clear()

    def clear(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B,) next position id per row
        self.pending: tuple[Any, int] | None = None

    def prefill(self, ids: list[int], reused: int, kv: KV | None, *, export: bool) -> tuple[torch.Tensor, KV | None]:
        cache = cache_from(self.model.config, cut(kv, reused) if kv else [])
        new = torch.tensor([ids[reused:]], dtype=torch.long)  # (1, T_new)
        positions = torch.arange(reused, len(ids)).unsqueeze(0)  # (1, T_new)
        kw = {self.cache_arg: cache, "use_cache": True, "logits_to_keep": 1}
        logits = self.model(input_ids=new, position_ids=positions, **kw).logits[0, -1]
        self.pending = (cache, len(ids))
        return logits, kv_of(cache)

    def join(self) -> None:
        assert self.pending is not None
        cache, length = self.pending
        mask = torch.ones((1, length), dtype=torch.long)
        if self.cache is not None:
            kv, self.mask = join_rows(kv_of(self.cache), self.mask, kv_of(cache), mask)
            self.cache = cache_from(self.model.config, kv)
            self.positions = torch.cat([self.positions, torch.tensor([length])])
        else:
            self.cache, self.mask, self.positions = cache, mask, torch.tensor([length])
        self.pending = None

    def step(self, last: list[int]) -> torch.Tensor:
        rows = len(last)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)  # (B, T+1)
        kw = {self.cache_arg: self.cache, "use_cache": True, "logits_to_keep": 1}
        ids = torch.tensor(last, dtype=torch.long)[:, None]  # (B, 1)
        logits = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions.unsqueeze(1), **kw).logits[:, -1]
        self.positions = self.positions + 1
        return logits

    def keep(self, rows: list[int]) -> list[int]:
        if rows:
            kv, self.mask = select_rows(kv_of(self.cache), self.mask, rows)
            self.cache = cache_from(self.model.config, kv)
            self.positions = self.positions[torch.tensor(rows)]
        else:
            self.clear()
        return rows


class BatchedBackend:
    """A backend whose generation goes through a BatchScheduler; everything else is delegated."""

    def __init__(self, backend: "Engine", **scheduler_kw: Any) -> None:
        self.inner = backend
        self.scheduler = BatchScheduler(backend, **scheduler_kw)
        self.name = backend.name

    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)

    @property
    def context_length(self) -> int:
        """The model's context, or on llama.cpp a batch slot's."""
        return getattr(self.scheduler.store, "context", None) or self.inner.context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.inner.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self.inner.has_chat_template

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        req = self.scheduler.submit(prompt_ids, params, max_new_tokens)  # raises QueueFull before iteration
        return self.scheduler.tokens(req)
