"""Server wiring of route/: routed names (a calibrated router from the store), A/B splits, the response cache and
the drift watch, with their metrics and the decision log. The policies, cache, split and drift math are pure
pieces in slmkit.route; this module only connects them to served models."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmkit.engine.decode import Step
from slmkit.model import GenerationStats, TextStream
from slmkit.route.cache import ResponseCache
from slmkit.route.cascade import Outcome, RoutedModel
from slmkit.route.drift import DriftWatch, Reference
from slmkit.route.policies import Chain, policy_from_dict
from slmkit.serve.metrics import Metrics

LOG = logging.getLogger("slmkit.route")
ESCALATION_LOG_ROWS = 10_000  # the escalation log's retention limit (the oldest rows go first)


class DecisionLog:
    """One JSON line per routed request (never the prompt's text), appended under a lock."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)


class EscalationLog:
    """Opt-in (serve --escalation-log): the requests a router escalated with the large model's answers, one JSON line
    each ({"time", "route", "row": a training row}), at most `max_rows` (the oldest go first), for `slmkit route
    harvest` to turn into the next student's training data. It holds users' text: keep it where they agreed to."""

    def __init__(self, path: Path, max_rows: int) -> None:
        self.path, self.max_rows = path, max_rows
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._rows = sum(1 for _ in path.open(encoding="utf-8")) if path.is_file() else 0  # counted once; then kept

    def write(self, route: str, row: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), "route": route, "row": row}, ensure_ascii=False) + "\n"
        with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
            self._rows += 1
            if self._rows > self.max_rows:  # the retention limit: rewritten without the oldest, atomically
                lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[-self.max_rows:]
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text("".join(lines), encoding="utf-8")
                tmp.replace(self.path)
                self._rows = len(lines)


def drift_of(router: dict[str, Any]) -> DriftWatch:
    d = router.get("drift") or {}
    refs = {k: Reference(v["edges"], v["expected"]) for k, v in d.items() if isinstance(v, dict) and "edges" in v}
    return DriftWatch(refs, escalation_rate=d.get("escalation_rate"))


def build_route(name: str, router: dict[str, Any], small: Any, large: Any, metrics: Metrics, log: DecisionLog, *,
                small_only: bool = False, escalations: EscalationLog | None = None) -> RoutedModel:
    """A RoutedModel from a stored router, its small model and its large target (route.targets: Local or an Endpoint
    the registry checked at start), with the hooks that count every outcome, log it and feed the drift watch."""
    chain = Chain(tuple(policy_from_dict(p) for p in router["policies"]))
    watch = drift_of(router)
    signal = (router.get("drift") or {}).get("confidence_signal")
    warned: set[str] = set()
    for s in [*watch.references, "escalation"]:
        metrics.drift_psi.labels(name, s).set_function(lambda s=s: (watch.escalation_shift() if s == "escalation" else watch.psi(s)) or 0.0)

    def record(o: Outcome) -> None:
        reason = o.decision.reason if o.decision else "none"
        metrics.route_decisions.labels(name, o.answered_by, reason).inc()
        if o.small_s is not None:
            metrics.route_latency.labels(name, "small").observe(o.small_s)
        if o.large_s is not None:
            metrics.route_latency.labels(name, "large").observe(o.large_s)
            metrics.route_large_calls.labels(name, "error" if o.error else "ok").inc()
        watch.observe("prompt_chars", float(o.prompt_chars))
        if signal and o.signals is not None:
            watch.observe("confidence", o.signals.get(signal))
        watch.observe_escalation(bool(o.decision and o.decision.escalate))
        drifted = watch.drifted()
        for s, v in drifted.items():
            if s not in warned:  # once per signal until it settles
                LOG.warning(json.dumps({"route": name, "drift": s, "psi": round(v, 3), "warn_at": watch.warn_at}))
        warned.clear()
        warned.update(drifted)
        log.write(o.as_record())
        if escalations is not None and o.exchange is not None:
            escalations.write(name, o.exchange)

    return RoutedModel(name, small, large, chain, small_only=small_only, on_outcome=[record])


class CachedGeneration(TextStream):
    """A cached answer replayed as a Generation (one piece)."""

    def __init__(self, text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None:
        self.text = ""
        self.steps: list[Step] = []
        self.stats = GenerationStats(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finish_reason=finish_reason)
        self.cached = True
        self._pieces = iter([text] if text else [])


class StoringGeneration:
    """Passes a generation through and caches its text once it finished on its own (not when cut short)."""

    def __init__(self, gen: Any, on_done: Callable[[Any], None]) -> None:
        self.gen, self._on_done, self._stored = gen, on_done, False

    def __getattr__(self, item: str) -> Any:
        return getattr(self.gen, item)

    def __iter__(self) -> "StoringGeneration":
        return self

    def __next__(self) -> str:
        try:
            return next(self.gen)
        except StopIteration:
            if not self._stored and self.gen.stats.finish_reason in ("stop", "length"):
                self._stored = True
                self._on_done(self.gen)
            raise

    def close(self) -> None:
        self.gen.close()


def cacheable(sampling: dict[str, Any], cache_sampled: bool) -> bool:
    """Greedy or seeded requests give the same answer every time; sampled ones are cached only when asked."""
    return cache_sampled or sampling.get("temperature") == 0 or sampling.get("seed") is not None


class CachedModel:
    """Any served model (plain or routed) behind a ResponseCache."""

    def __init__(self, name: str, inner: Any, cache: ResponseCache, metrics: Metrics, *, cache_sampled: bool = False) -> None:
        self.name, self.inner, self.cache, self.metrics, self.cache_sampled = name, inner, cache, metrics, cache_sampled
        self._lock = threading.Lock()
        metrics.cache_entries.labels(name).set_function(lambda: len(cache))

    # (Servable) tokens, embeddings and the one model behind the answers are the inner one's
    @property
    def backend(self) -> Any:
        return self.inner.backend

    @property
    def single(self) -> Any:
        return self.inner.single

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def count_chat(self, messages: Sequence[dict[str, Any]]) -> int:
        return self.inner.count_chat(messages)

    def _lookup(self, messages: Sequence[dict[str, Any]], sampling: dict[str, Any], start: Callable[[], Any], prompt_tokens: Callable[[], int]) -> Any:
        if not cacheable(sampling, self.cache_sampled):
            return start()
        key, ctx = ResponseCache.keys(self.name, messages, {k: v for k, v in sampling.items() if k != "top_logprobs"})
        emb = None
        if self.cache.similarity is not None and messages:
            emb = self.inner.backend.embed([str(messages[-1].get("content", ""))])[0]
        with self._lock:
            before = self.cache.semantic_hits
            hit = self.cache.get(key, ctx, emb)
            semantic = self.cache.semantic_hits > before
        if hit is not None:
            self.metrics.cache_requests.labels(self.name, "semantic_hit" if semantic else "hit").inc()
            self.metrics.cache_saved_tokens.labels(self.name).inc(hit.completion_tokens)
            return CachedGeneration(hit.text, prompt_tokens(), hit.completion_tokens, hit.finish_reason)
        self.metrics.cache_requests.labels(self.name, "miss").inc()

        def store(gen: Any) -> None:
            with self._lock:
                self.cache.put(key, gen.text, gen.stats.completion_tokens, gen.stats.finish_reason, context=ctx, embedding=emb)

        return StoringGeneration(start(), store)

    def stream_chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Any:
        msgs = [dict(m) for m in messages]
        return self._lookup(msgs, sampling, lambda: self.inner.stream_chat(msgs, **sampling),
                            lambda: self.inner.count_chat(msgs))

    def stream(self, prompt: str, **sampling: Any) -> Any:
        return self._lookup([{"role": "prompt", "content": prompt}], sampling, lambda: self.inner.stream(prompt, **sampling),
                            lambda: self.inner.count_tokens(prompt))
