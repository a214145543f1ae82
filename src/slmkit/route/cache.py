"""A response cache in front of any served model: exact match on (model, conversation, sampling), and, when a
similarity threshold is set, semantic match: the same model, conversation before the last message and sampling,
with the last message's embedding at cosine >= threshold to a cached one. Bounded in entries (least recently used
goes first) and in age (TTL). Pure: the caller gives embeddings and the clock."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slmkit.errors import SlmkitError

CACHE_ENTRIES = 1024
CACHE_TTL_S = 3600.0


@dataclass
class Entry:
    text: str
    completion_tokens: int
    finish_reason: str | None
    created: float
    embedding: tuple[float, ...] | None = None
    context: str = ""  # hash of everything but the last message, for semantic matches


@dataclass
class ResponseCache:
    max_entries: int = CACHE_ENTRIES
    ttl_s: float = CACHE_TTL_S
    similarity: float | None = None  # None: exact matches only
    clock: Callable[[], float] = time.monotonic
    _entries: "OrderedDict[str, Entry]" = field(default_factory=OrderedDict)
    hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    saved_tokens: int = 0
    evictions: int = 0

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.ttl_s <= 0:
            raise SlmkitError("the cache needs at least one entry and a TTL > 0", "Fix --cache-size / --cache-ttl.")
        if self.similarity is not None and not 0 < self.similarity <= 1:
            raise SlmkitError(f"cache similarity {self.similarity} must be in (0, 1]", "For example --cache-similarity 0.95.")

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def keys(model: str, messages: Sequence[dict[str, Any]], sampling: dict[str, Any]) -> tuple[str, str]:
        """(exact key, context key): the context key leaves out the last message's text."""
        settings = json.dumps(sampling, sort_keys=True, default=str)
        ctx = json.dumps([model, list(messages[:-1]), messages[-1].get("role") if messages else None, settings], sort_keys=True)
        exact = json.dumps([ctx, messages[-1].get("content") if messages else None])
        return hashlib.sha256(exact.encode()).hexdigest(), hashlib.sha256(ctx.encode()).hexdigest()

    def _expire(self) -> None:
        now = self.clock()
        for k in [k for k, e in self._entries.items() if now - e.created > self.ttl_s]:
            del self._entries[k]

    def get(self, key: str, context: str = "", embedding: Sequence[float] | None = None) -> Entry | None:
        self._expire()
        e = self._entries.get(key)
        if e is None and self.similarity is not None and embedding is not None:
            best, best_sim = None, self.similarity
            for k, cand in self._entries.items():
                if cand.context == context and cand.embedding is not None:
                    sim = cosine(embedding, cand.embedding)
                    if sim >= best_sim:
                        best, best_sim = k, sim
            if best is not None:
                key, e = best, self._entries[best]
                self.semantic_hits += 1
        if e is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        self.saved_tokens += e.completion_tokens
        return e

    def put(self, key: str, text: str, completion_tokens: int, finish_reason: str | None, *, context: str = "",
            embedding: Sequence[float] | None = None) -> None:
        self._entries[key] = Entry(text, completion_tokens, finish_reason, self.clock(),
                                   tuple(embedding) if embedding is not None else None, context)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0
