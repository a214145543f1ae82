"""Continuous batching for the PyTorch backend: requests join and leave the running batch at every step.

One worker thread owns the model. A new request is prefilled alone (reusing a cached prompt prefix when one
matches; on the slot cache in pieces of PREFILL_CHUNK tokens with a decode step of the running rows between two
pieces, so a burst of long prompts does not stall the streams already running), or, on the slot cache, together
with the requests admitted after it when their uncached prompt parts are short and equally long (a burst sharing
a system prompt or a chat history: one forward instead of one each); then its KV rows join the running batch;
each decode step runs one forward pass for all running sequences. Finished or cancelled sequences leave at once.
Consumers read token ids from a per-request queue.
The batch's KV lives in the backend's batch store (`Backend.batch_store`): on llama.cpp, one sequence per slot
of a multi-sequence context (`llamacpp_batch.LlamaCppSlots`); on PyTorch, Llama-layout models in a preallocated
slot cache and other models in a left-padded transformers cache (`torch_batch.SlotKV`, `torch_batch.DynamicKV`).
"""

from __future__ import annotations

import collections
import inspect
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from slmkit.engine.decode import Step, check_draft, steps_of, tokens_of
from slmkit.engine.kv_cache import PrefixCache
from slmkit.engine.sampling import RowsFailed, SamplingParams, candidates, make_generator, sample_next, sample_rows
from slmkit.engine.speculative import PromptLookup, Throttle
from slmkit.errors import SlmkitError

if TYPE_CHECKING:
    from slmkit.engine.backend import Backend as Engine, TokenScores

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
    adapter: int = 0  # the LoRA adapter the request runs with over the shared base (0: none)
    client: str = ""  # who sent it (the server's CLIENT: an address); "" in library use
    drafts: PromptLookup | None = None  # speculative decoding (params.speculative, no grammar): its drafts, its throttle
    throttle: Throttle = field(default_factory=Throttle)


MAX_BATCH = 16  # sequences decoded together
PREFILL_CHUNK = 128  # prompt tokens prefilled between two decode steps of the running rows (chunked prefill)
MAX_QUEUE = 64  # requests waiting; beyond, QueueFull
# Who is asking: the server sets it per request (its address), submit() reads it. A client may hold at most
# `max_queue_per_client` waiting requests (default half the queue), and the next free batch slot goes to the waiting
# client with the fewest running requests, not to whoever queued most: one client cannot starve the rest.
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("slmkit_client", default="")
PREFIX_CACHE_TOKENS = 4096  # prompt tokens of KV kept for reuse
BURST_TOKENS = 16  # requests admitted together whose uncached prompt parts are this short and equally long: one forward


# a request's prefill input: its ids, its prefix cache, how many of the ids the cache holds, and that cached KV
_Lookup = tuple[list[int], PrefixCache | None, int, Any]


class BatchScheduler:
    """Runs requests on one backend (PyTorch or llama.cpp) with a shared, continuously changing batch."""

    def __init__(self, backend: "Engine | Callable[[], Engine]", *, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
                 context: int | None = None, prefill_chunk: int = PREFILL_CHUNK, max_queue_per_client: int | None = None) -> None:
        """`backend`: an open backend, or a function that opens one: then the worker thread opens it itself, so one
        thread loads and runs the model. On CPU that matters: OpenMP keeps a thread pool per thread that runs
        parallel work, and with two pools on the same cores libgomp stops spinning between parallel regions; a
        decode step of the default model measured 1.7x slower in a thread other than the one that loaded it."""
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client or max(1, max_queue // 2)
        self._last_client = ""
        self.prefill_chunk = prefill_chunk
        self.prefill_steps = 0  # decode steps run between prefill pieces (chunked prefill), for tests and metrics
        self.burst_prefills = 0  # forwards that prefilled several admitted requests at once
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self._adapter_caches: dict[int, PrefixCache] = {}
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._admitted = 0  # taken from the queue, not yet in the running batch (being prefilled)
        self._jobs: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()  # call(): run between steps
        opened: "queue.Queue[BaseException | None]" = queue.Queue()

        def run() -> None:
            try:
                self.backend = backend() if inspect.isfunction(backend) else backend  # an opener, or an open backend
                self.store = self.backend.batch_store(max_batch, context)
                self.prefix = list(self.backend.prefix)
            except BaseException as exc:  # the caller raises it
                opened.put(exc)
                return
            opened.put(None)
            self._loop()

        self._thread = threading.Thread(target=run, name="slmkit-scheduler", daemon=True)
        self._thread.start()
        failed = opened.get()
        if failed is not None:
            raise failed

    # ---- public -----------------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams, max_new: int, adapter: int = 0) -> _Request:
        with self._cv:
            if self._stopping:
                raise SlmkitError("the server is shutting down", "Retry against a running server.")
            # free batch slots count too: a burst fills the batch and the queue before anyone gets a 429
            in_flight = len(self.waiting) + len(self.running) + self._admitted
            if in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"the request queue is full ({len(self.waiting)} waiting, {len(self.running)} running)", "Retry in a moment.")
            client = CLIENT.get()
            if client and sum(r.client == client for r in self.waiting) >= self.max_queue_per_client:
                raise QueueFull(f"this client already has {self.max_queue_per_client} requests waiting (its share of the "
                                f"queue of {self.max_queue})", "Wait for your running requests, then retry.")
            req = _Request(list(prompt), params, max_new, generator=make_generator(params.seed), history=list(prompt),
                           adapter=adapter, client=client,
                           drafts=PromptLookup(prompt) if params.speculative and params.constraint is None else None)
            self.waiting.append(req)
            self._cv.notify()
        return req

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() run on the scheduler's thread between two steps; its result (or its exception). The model's other
        work (embeddings, scoring) goes through here: a second thread running torch's parallel work would leave two
        OpenMP pools on the same cores, and libgomp would stop spinning in both for the rest of the process (one
        /v1/embeddings request measured 640 -> 465 tok/s at 16 streams afterwards; see __init__)."""
        if threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()
        with self._cv:
            if self._stopping:
                raise SlmkitError("the server is shutting down", "Retry against a running server.")
            self._jobs.append((fn, done))
            self._cv.notify()
        return done.result()

    def steps(self, req: _Request) -> Iterator[Step]:
        """A request's tokens (with their log-probabilities) as they are made; closing this cancels the request."""
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
        if not self._thread.is_alive():
            self.store.close()

    # ---- worker -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self.running and not self._jobs and not self._stopping:
                    self._cv.wait()
                jobs = [self._jobs.popleft() for _ in range(len(self._jobs))]
            for fn, done in jobs:
                try:
                    done.set_result(fn())
                except BaseException as exc:  # the caller raises it
                    done.set_exception(exc)
            with self._cv:
                if self._stopping and not self.running:
                    for _, done in self._jobs:
                        done.set_exception(SlmkitError("the server shut down", "Retry against a running server."))
                    return
                admit = []
                while self.waiting and len(self.running) + len(admit) < self.max_batch:
                    admit.append(self._next_fair(admit))
                self._admitted = len(admit)
            try:
                i = 0
                while i < len(admit):
                    group = self._prefill_group(admit[i:])  # one request, or a burst prefilled together
                    with self._cv:  # one step for admission: never counted twice, never missed
                        for req, joined in group:
                            self._admitted -= 1
                            if joined:
                                self.running.append(req)
                    i += len(group)
                if self.running:
                    self._step()
            except BaseException as exc:  # a failure ends the affected requests, not the server
                for req in self.running + admit:
                    req.out.put(exc)
                self.running = []
                self._admitted = 0
                self.store.clear()

    def _next_fair(self, admitting: list[_Request]) -> _Request:
        """Take the waiting request whose client has the fewest requests running (or being admitted), a client other
        than the one admitted last on a tie, then the oldest: arrival order among equals."""
        busy = collections.Counter(r.client for r in self.running + admitting)
        best = min(range(len(self.waiting)),
                   key=lambda i: (busy[self.waiting[i].client], self.waiting[i].client == self._last_client, i))
        req = self.waiting[best]
        del self.waiting[best]
        self._last_client = req.client
        return req

    @torch.inference_mode()
    def _prefill_group(self, reqs: list[_Request]) -> list[tuple[_Request, bool]]:
        """Prefill reqs[0], or reqs[0] and the requests after it whose uncached prompt parts are as short and as long
        (a burst sharing a cached prefix: one forward for all); hand out each one's first token. Returns
        (request, joins the running batch) for the requests taken."""
        first = reqs[0]
        if first.cancelled.is_set():
            return [(first, False)]
        looked = [self._lookup(first)]
        rest = len(looked[0][0]) - looked[0][2]
        if rest <= BURST_TOKENS and self.store.bursts:
            for req in reqs[1:]:
                if req.cancelled.is_set() or len(looked) == self.max_batch - len(self.running) or self._uncached(req) != rest:
                    break
                looked.append(self._lookup(req))
        if len(looked) == 1:
            return [(first, self._prefill(first, looked[0]))]
        taken = reqs[: len(looked)]
        outs = self.store.prefill_many([(ids, reused, kv, r.adapter) for r, (ids, _, reused, kv) in zip(taken, looked)],
                                       export=self.prefix_cache is not None)
        self.burst_prefills += 1
        return [(r, self._first_token(r, item, logits, row_kv)) for r, item, (logits, row_kv) in zip(taken, looked, outs)]

    def _source(self, req: _Request) -> tuple[list[int], PrefixCache | None]:
        """The ids to prefill (a prompt-tuned model's virtual tokens first) and the prefix cache they may reuse."""
        return self.prefix + req.prompt, self._prefix_cache(req.adapter)

    def _lookup(self, req: _Request) -> _Lookup:
        """A request's ids to prefill and the longest cached prefix of them."""
        ids, cache = self._source(req)
        reused, kv = cache.lookup(ids) if cache else (0, None)
        return ids, cache, reused, kv

    def _uncached(self, req: _Request) -> int:
        """How many of a request's prompt tokens a prefill would compute (its cache looked at, not counted)."""
        ids, cache = self._source(req)
        return len(ids) - (cache.peek(ids) if cache else 0)

    def _prefill(self, req: _Request, item: _Lookup) -> bool:
        """Prefill one request alone and hand out its first token; True when it joins the running batch."""
        ids, cache, reused, kv = item
        kw: dict[str, Any] = {"adapter": req.adapter} if req.adapter else {}  # only the slot cache runs adapters
        if self.running and self.prefill_chunk and self.store.chunked:
            kw.update(between=self._step_between, chunk=self.prefill_chunk)
        logits, row_kv = self.store.prefill(ids, reused, kv, export=cache is not None, **kw)
        return self._first_token(req, item, logits, row_kv)

    def _first_token(self, req: _Request, item: _Lookup, logits: torch.Tensor, row_kv: Any) -> bool:
        """After a prefill: keep its KV in the prefix cache, sample and hand out the first token, join or drop."""
        ids, cache, _, _ = item
        if cache and row_kv is not None:
            cache.store(ids, row_kv)
        try:
            token = sample_next(logits, req.params, req.history, req.generator)
        except RowsFailed as exc:  # this request alone
            req.out.put(exc)
            self.store.drop()
            return False
        if not self._emit(req, steps_of(logits[None], [token], [req.params.top_logprobs])[0]):
            self.store.drop()
            return False
        self.store.join()
        return True

    def _prefix_cache(self, adapter: int) -> PrefixCache | None:
        """The prompt-prefix KV cache of an adapter's requests (keys and values differ per adapter)."""
        if adapter == 0 or self.prefix_cache is None:
            return self.prefix_cache
        return self._adapter_caches.setdefault(adapter, PrefixCache(self.prefix_cache.max_tokens))

    def _step_between(self) -> None:
        """A decode step for the running rows between two pieces of a prompt being prefilled."""
        if self.running:
            self._step()
            self.prefill_steps += 1

    def _emit(self, req: _Request, step: Step) -> bool:
        """Hand a token to the consumer; False when the request is finished."""
        req.out.put(step)
        req.produced += 1
        req.history.append(step.token)
        if req.drafts is not None:
            req.drafts.push(step.token)
        if step.token in self.backend.eos_token_ids or req.produced >= req.max_new or req.cancelled.is_set():
            req.out.put(_DONE)
            return False
        return True

    @torch.inference_mode()
    def _step(self) -> None:
        run = self.running
        drafts = self._drafts() if self.store.checks else []
        t0 = time.perf_counter()
        if any(drafts):
            self._check(drafts, t0)
            return
        logits = self.store.step([r.history[-1] for r in run])  # (B, V)
        seconds = time.perf_counter() - t0
        for r in run:
            if r.drafts is not None:
                r.throttle.plain(seconds)
        failed: dict[int, str] = {}
        params, histories = [r.params for r in run], [r.history for r in run]
        cands = candidates(logits, params, histories)  # (None: whole rows are read)
        try:
            tokens = sample_rows(logits, params, histories, [r.generator for r in run], cands)
        except RowsFailed as exc:  # those rows' requests end with the error; the rest of the batch goes on
            tokens, failed = exc.tokens, exc.failed
            for i, why in failed.items():
                run[i].out.put(RowsFailed({0: why}, [0]))
        steps = steps_of(logits, tokens, [r.params.top_logprobs for r in run], cands)
        keep = []
        for i, (req, step) in enumerate(zip(run, steps)):
            if i in failed:
                continue
            if req.cancelled.is_set():
                req.out.put(_DONE)
                continue
            if self._emit(req, step):
                keep.append(i)
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in self.store.keep(keep)]

    def _drafts(self) -> list[list[int]]:
        """Each running row's prompt-lookup drafts (none where its request does not speculate, its throttle has
        paused it, or its budget has room for one token only)."""
        out = []
        for r in self.running:
            room = min(r.params.speculative, r.max_new - r.produced - 1)
            out.append(r.drafts.draft(room) if r.drafts is not None and room > 0 and r.throttle.allow() else [])
        return out

    def _check(self, drafts: list[list[int]], t0: float) -> None:
        """A speculative step: every running row runs its last token and its drafts in one forward; each request
        keeps the drafts it accepts (decode.check_draft's rule: greedy's tokens, or sampling's distribution), then takes
        its next token from the logits after them; the refused drafts are forgotten."""
        run = self.running
        rows = self.store.check([[r.history[-1], *d] for r, d in zip(run, drafts)])  # per row (1 + drafts, V)
        seconds = time.perf_counter() - t0
        keep = []
        for i, (req, draft, logits) in enumerate(zip(run, drafts, rows)):
            if req.cancelled.is_set():
                req.out.put(_DONE)
                continue
            try:
                going, kept = self._accept(req, draft, logits)
            except RowsFailed as exc:  # this request alone
                req.out.put(exc)
                continue
            if draft:
                req.throttle.checked(seconds, len(draft), kept)
                self.store.forget(i, len(draft) - kept)
            elif req.drafts is not None:
                req.throttle.plain(seconds)
            if going:
                keep.append(i)
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in self.store.keep(keep)]

    def _accept(self, req: _Request, draft: list[int], logits: torch.Tensor) -> tuple[bool, int]:
        """Hand out the drafts `req` keeps and the token after them; (still running, drafts kept)."""
        params, top = req.params, [req.params.top_logprobs]
        chosen = None
        for kept, proposed in enumerate(draft):
            accepted, chosen = check_draft(logits[kept], proposed, params, req.history, req.generator)
            if not accepted:
                break
            step = steps_of(logits[kept][None], [proposed], top)[0]
            if not self._emit(req, replace(step, drafted=True, checked=len(draft) if kept == 0 else 0)):
                return False, kept + 1
        else:
            kept = len(draft)
        token = chosen if chosen is not None else sample_next(logits[kept], params, req.history, req.generator)
        step = steps_of(logits[kept][None], [token], top)[0]
        return self._emit(req, replace(step, checked=len(draft)) if draft and kept == 0 else step), kept


class BatchedBackend:
    """A backend whose generation goes through a BatchScheduler; everything else is delegated."""

    adapter = 0  # the LoRA adapter its requests run with (AdapterView: one of several over the same base)

    def __init__(self, backend: "Engine | Callable[[], Engine]", **scheduler_kw: Any) -> None:
        """`backend`: an open backend, or a function opening one on the scheduler's thread (see BatchScheduler)."""
        self.scheduler = BatchScheduler(backend, **scheduler_kw)
        self.inner = self.scheduler.backend
        self.name = self.inner.name

    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)

    @property
    def context_length(self) -> int:
        """The model's context, or on llama.cpp a batch slot's."""
        return self.scheduler.store.context or self.inner.context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.inner.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self.inner.has_chat_template

    # the model's other work runs on the scheduler's thread too (BatchScheduler.call says why)
    def embed(self, texts: Sequence[str | Sequence[int]]) -> list[list[float]]:
        return self.scheduler.call(lambda: self.inner.embed(texts))

    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> "list[TokenScores]":
        return self.scheduler.call(lambda: self.inner.score_batch(requests))

    def score_continuations(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        return self.scheduler.call(lambda: self.inner.score_continuations(prefix, continuations))

    def logprob_rows(self, ids: Sequence[int]) -> "torch.Tensor":
        return self.scheduler.call(lambda: self.inner.logprob_rows(ids))

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int, *,
                       stop_at_eos: bool = True) -> list[list[Step]]:
        return self.scheduler.call(lambda: self.inner.generate_batch(prompts, params, max_new_tokens, stop_at_eos=stop_at_eos))

    def stream_steps(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[Step]:
        req = self.scheduler.submit(prompt_ids, params, max_new_tokens, self.adapter)  # QueueFull before iteration
        return self.scheduler.steps(req)

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        return tokens_of(self.stream_steps(prompt_ids, params, max_new_tokens))


class AdapterView(BatchedBackend):
    """One LoRA adapter served over a shared base: generation goes through the base's scheduler with the adapter's
    id (rows of different adapters share its batch); everything else is the base's (tokenizer, template, context).
    Embeddings and scoring run the base alone."""

    def __init__(self, batched: BatchedBackend, adapter: int) -> None:  # shares the base's scheduler: no new one
        self.scheduler, self.inner, self.name = batched.scheduler, batched.inner, batched.name
        self.adapter = adapter
