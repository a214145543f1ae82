"""The models a server offers, loaded on first use, each behind its own continuous-batching scheduler.

Each model runs on llama.cpp (its GGUF file) or on PyTorch (its safetensors weights), opened through
slmkit.loading (`pick_backend`: `auto` takes llama.cpp where the store folder has a GGUF, always the model's own
weights: an imported GGUF such as the default model's, or an export installed with --name; at batch 1 it decodes
several times faster than PyTorch on a CPU, and batched it still leads). Models with no GGUF run on PyTorch.
"""

from __future__ import annotations

import threading

from slmkit.engine.scheduler import BatchedBackend
from slmkit.errors import ModelNotFound, SlmkitError
from slmkit.loading import open_backend, pick_backend
from slmkit.model import Model
from slmkit.serve.metrics import Metrics
from slmkit.store import Store


class ModelRegistry:
    def __init__(self, names: list[str], metrics: Metrics, *, max_batch: int, max_queue: int, prefix_cache_tokens: int,
                 store: Store | None = None, backend: str = "auto", context: int | None = None) -> None:
        self.store = store or Store()
        self.backends = {name: pick_backend(self.store.require(name), backend) for name in names}  # fail at start-up
        self.names = list(dict.fromkeys(names))
        self.metrics = metrics
        self.max_batch, self.max_queue, self.prefix_cache_tokens = max_batch, max_queue, prefix_cache_tokens
        self.context = context
        self._models: dict[str, Model] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> Model:
        name = name or self.names[0]
        if name not in self.names:
            raise ModelNotFound(f"model {name!r} not found", f"Models served: {', '.join(self.names)}")
        with self._lock:
            if name not in self._models:
                backend = open_backend(self.store.require(name), self.backends[name], serving=True)
                batched = BatchedBackend(backend, max_batch=self.max_batch, max_queue=self.max_queue,
                                         prefix_cache_tokens=self.prefix_cache_tokens, context=self.context)
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
