"""The models a server offers, loaded on first use, each behind its own continuous-batching scheduler."""

from __future__ import annotations

import threading

from slmkit.engine.scheduler import BatchedBackend
from slmkit.engine.torch_backend import TorchBackend
from slmkit.errors import ModelNotFound, SlmkitError
from slmkit.model import Model
from slmkit.serve.metrics import Metrics
from slmkit.store import Store


class ModelRegistry:
    def __init__(self, names: list[str], metrics: Metrics, *, max_batch: int, max_queue: int, prefix_cache_tokens: int, store: Store | None = None) -> None:
        self.store = store or Store()
        for name in names:
            self.store.require(name)  # fail at start-up, not at the first request
        self.names = list(dict.fromkeys(names))
        self.metrics = metrics
        self.max_batch, self.max_queue, self.prefix_cache_tokens = max_batch, max_queue, prefix_cache_tokens
        self._models: dict[str, Model] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> Model:
        name = name or self.names[0]
        if name not in self.names:
            raise ModelNotFound(f"model {name!r} not found", f"Models served: {', '.join(self.names)}")
        with self._lock:
            if name not in self._models:
                from slmkit.config import settings

                backend = TorchBackend.from_folder(self.store.require(name), threads=settings().threads)
                batched = BatchedBackend(backend, max_batch=self.max_batch, max_queue=self.max_queue,
                                         prefix_cache_tokens=self.prefix_cache_tokens)
                sched = batched.scheduler
                self.metrics.watch(name, lambda: sched.queue_depth, lambda: sched.batch_size,
                                   lambda: sched.prefix_cache.hit_rate if sched.prefix_cache else 0.0)
                self._models[name] = Model(name, batched, self.store.card(name))
            return self._models[name]

    def stop(self, timeout: float = 10.0) -> None:
        for m in self._models.values():
            m.backend.scheduler.stop(timeout)

    def loaded(self) -> list[str]:
        return list(self._models)


class BadRequest(SlmkitError):
    """A request the server refuses with 400 (limits, context window)."""
