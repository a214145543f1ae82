"""The names a server offers, loaded on first use: models (each behind its own continuous-batching scheduler),
routers (a calibrated router from the store, served as one name: slmkit.route), and A/B splits over those;
optionally each behind a response cache.

LoRA adapters of one base, with the base itself where it runs on PyTorch, are served over one loaded base behind
one scheduler when two or more of them are served: each adapter is its own model name, and requests for different
adapters share the batch (layers/multi_lora.py). A lone adapter is served merged into its base (no per-step cost).

Each model runs on llama.cpp (its GGUF file) or on PyTorch (its safetensors weights), opened through
slmkit.loading (`pick_backend`: `auto` takes llama.cpp where the store folder has a GGUF, always the model's own
weights: an imported GGUF such as the default model's, or an export installed with --name; at batch 1 it decodes
several times faster than PyTorch on a CPU, and batched it still leads). Models with no GGUF run on PyTorch.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmkit.data.classify import task_of
from slmkit.engine.scheduler import AdapterView, BatchedBackend
from slmkit.errors import ModelNotFound, SlmkitError
from slmkit.loading import open_backend, pick_backend
from slmkit.model import Model
from slmkit.route.ab import Split
from slmkit.route.cache import ResponseCache
from slmkit.route.targets import Local
from slmkit.sources.endpoint import Endpoint
from slmkit.serve.hybrid import CachedModel, DecisionLog, EscalationLog, build_route
from slmkit.serve.metrics import Metrics
from slmkit.sources.forms import is_adapter, is_router, read_router
from slmkit.store import Store


def settled(backend: Any) -> Any:
    """`backend`, just opened for serving, with every object Python tracks moved out of the cyclic collector's walks
    (gc.freeze): a loaded model is ~400k objects, and a full collection of them (~160 ms here) otherwise lands inside
    a burst of requests (16 streams' first burst on the default w8a8 model: TTFT p50 0.32-0.34 -> 0.13 s, measured).
    `thaw` gives them back when a model is freed."""
    gc.collect()
    gc.freeze()
    return backend


def thaw() -> None:
    """After a model is freed: let the collector walk everything again (the freed model's cycles go), then settle
    what is left."""
    gc.unfreeze()
    settled(None)


class ModelRegistry:
    def __init__(self, names: list[str], metrics: Metrics, *, max_batch: int, max_queue: int, prefix_cache_tokens: int,
                 store: Store | None = None, backend: str = "auto", context: int | None = None, splits: Sequence[Split] = (),
                 cache: Callable[[], ResponseCache] | None = None, cache_sampled: bool = False, small_only: bool = False,
                 large_key: str | None = None, decision_log: Path | None = None, max_queue_per_client: int | None = None,
                 escalation_log: EscalationLog | None = None) -> None:
        self.store = store or Store()
        self.routers: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, Endpoint] = {}  # routers' large targets that are OpenAI endpoints
        self.splits = {s.name: s for s in splits}
        models: list[str] = []
        for name in names:  # fail at start-up: unknown names, unreachable endpoints
            folder = self.store.require(name)
            if is_router(folder):
                router = self.routers[name] = read_router(folder)
                models.append(router["small"])
                large = router["large"]
                if "store" in large:
                    models.append(large["store"])
                else:  # one client per router, checked now (unless small-only): an unreachable endpoint fails at start
                    endpoint = self.endpoints[name] = Endpoint(large["url"], large.get("model"), large_key)
                    if not small_only:
                        endpoint.check()
            else:
                models.append(name)
        for split in splits:
            if split.name in names or self.store.exists(split.name):
                raise SlmkitError(f"the A/B split's name {split.name!r} is already a model's", "Give the split another name.")
            for arm in split.arms:
                if arm not in names:
                    raise SlmkitError(f"A/B split {split.name!r}: arm {arm!r} is not served", f"Serve it too: slmkit serve {' '.join(names)} {arm} ...")
        self.backend_choice = backend
        self.backends = {m: pick_backend(self.store.require(m), backend) for m in dict.fromkeys(models)}
        self.groups = self._adapter_groups(list(self.backends))  # served name -> (base, adapter names in id order)
        self._shared: dict[str, BatchedBackend] = {}  # base name -> the scheduler its group shares
        self.names = list(dict.fromkeys([*names, *self.splits]))
        self.metrics = metrics
        self.max_batch, self.max_queue, self.prefix_cache_tokens = max_batch, max_queue, prefix_cache_tokens
        self.max_queue_per_client = max_queue_per_client
        self.context = context
        self.cache, self.cache_sampled = cache, cache_sampled
        self.small_only = small_only
        self.decisions = DecisionLog(decision_log)
        self.escalations = escalation_log
        self._models: dict[str, Model] = {}
        self._served: dict[str, Any] = {}
        self._lock = threading.RLock()
        self.expires: dict[str, float] = {}  # name -> time.monotonic() after which an idle model is freed (keep_alive)

    def get(self, name: str | None, user: str | None = None) -> Any:
        """What serves `name`: a Model, a routed model or a cached one (all generate alike). For an A/B split,
        the arm for `user` (sticky per user key)."""
        name = name or self.names[0]
        if name not in self.names:
            raise ModelNotFound(f"model {name!r} not found", f"Models served: {', '.join(self.names)}")
        if name in self.splits:
            arm = self.splits[name].arm(user)
            self.metrics.ab_requests.labels(name, arm).inc()
            return self.get(arm)
        with self._lock:
            if name not in self._served:
                served: Any
                if name in self.routers:
                    router = self.routers[name]
                    large = self.endpoints.get(name) or Local(self.model(router["large"]["store"]))
                    served = build_route(name, router, self.model(router["small"]), large, self.metrics, self.decisions,
                                         small_only=self.small_only, escalations=self.escalations)
                else:
                    served = self.model(name)
                self._served[name] = CachedModel(name, served, self.cache(), self.metrics, cache_sampled=self.cache_sampled) if self.cache else served
            return self._served[name]

    def _adapter_groups(self, models: list[str]) -> dict[str, tuple[str, list[str]]]:
        """Which served names share one loaded base: the LoRA adapters of a Llama-layout base (checked against the
        base's file hashes now), with the base itself when it runs on PyTorch, where two or more names share it.
        Adapters a per-row update cannot express (DoRA, extra trained modules) are served merged, on their own."""
        from slmkit.engine.families import MULTI_LORA_TYPES
        from slmkit.sources.adapters import base_of, per_row_problem
        from slmkit.card import read_config

        by_base: dict[str, list[str]] = {}
        for m in models:
            folder = self.store.require(m)
            # a classifier's labels are scored, and scoring runs a shared base alone: a classifier is served merged
            if (self.backends[m] == "torch" and is_adapter(folder) and per_row_problem(folder) is None
                    and not task_of(self.store.card(m).settings)):
                base, base_folder = base_of(folder)
                if read_config(base_folder).get("model_type") in MULTI_LORA_TYPES:
                    by_base.setdefault(base, []).append(m)
        groups = {}
        for base, adapters in by_base.items():
            members = adapters + ([base] if self.backends.get(base) == "torch" else [])
            if len(members) >= 2:
                groups.update({m: (base, adapters) for m in members})
        return groups

    def _shared_backend(self, base: str, adapters: list[str]) -> BatchedBackend:
        """The one scheduler over `base` with `adapters` loaded as ids 1..n (opened on the scheduler's thread)."""
        if base not in self._shared:
            def open_group() -> Any:
                return settled(open_backend(self.store.require(base), "torch", serving=True, adapters=[self.store.require(a) for a in adapters]))

            self._shared[base] = BatchedBackend(open_group, max_batch=self.max_batch, max_queue=self.max_queue,
                                                prefix_cache_tokens=self.prefix_cache_tokens, context=self.context,
                                                max_queue_per_client=self.max_queue_per_client)
        return self._shared[base]

    def model(self, name: str) -> Model:
        """A model of the store behind its scheduler, loaded once (served names and routers' models share it)."""
        with self._lock:
            if name in self.groups and name not in self._models:
                base, adapters = self.groups[name]
                shared = self._shared_backend(base, adapters)
                served = AdapterView(shared, adapters.index(name) + 1) if name in adapters else shared
                sched = shared.scheduler
                self.metrics.watch(name, lambda: sched.queue_depth, lambda: sched.batch_size,
                                   lambda: sched.prefix_cache.hit_rate if sched.prefix_cache else 0.0)
                self._models[name] = Model(name, served, self.store.card(name))
            if name not in self._models:
                folder, kind = self.store.require(name), self.backends[name]
                # opened on the scheduler's own thread: the thread that runs the model also loads it
                batched = BatchedBackend(lambda: settled(open_backend(folder, kind, serving=True)), max_batch=self.max_batch,
                                         max_queue=self.max_queue, prefix_cache_tokens=self.prefix_cache_tokens,
                                         context=self.context, max_queue_per_client=self.max_queue_per_client)
                sched = batched.scheduler
                self.metrics.watch(name, lambda: sched.queue_depth, lambda: sched.batch_size,
                                   lambda: sched.prefix_cache.hit_rate if sched.prefix_cache else 0.0)
                self._models[name] = Model(name, batched, self.store.card(name))
            return self._models[name]

    def unload(self, name: str, timeout: float = 60.0) -> bool:
        """Free a loaded model (Ollama's keep_alive 0): its requests finish (for up to `timeout` s), its scheduler
        stops and its weights go; the next request loads it again. A model that shares its base with adapters or
        serves inside a router stays (False)."""
        with self._lock:
            in_router = {m for r in self.routers.values() for m in (r["small"], r["large"].get("store"))}
            if name not in self._models or name in self.groups or name in in_router:
                return False
            model = self._models.pop(name)
            self._served.pop(name, None)
            self.expires.pop(name, None)
        model.backend.scheduler.stop(timeout)
        self.metrics.unwatch(name)
        del model
        thaw()
        return True

    def keep(self, name: str, seconds: float | None) -> None:
        """Ollama's keep_alive: free `name` once idle `seconds` from now (inf: never; None: leave as it is)."""
        if seconds is None:
            return
        if math.isinf(seconds):
            self.expires.pop(name, None)
        else:
            self.expires[name] = time.monotonic() + seconds

    def expired(self) -> list[str]:
        """Loaded models whose keep_alive has passed and that have nothing running or waiting."""
        now = time.monotonic()
        with self._lock:
            return [n for n, t in self.expires.items() if t <= now and n in self._models
                    and self._models[n].backend.scheduler.queue_depth == 0 and self._models[n].backend.scheduler.batch_size == 0]

    def expires_at(self, name: str) -> float | None:
        """The wall-clock time `name` is freed at (for /api/ps), or None when it stays loaded."""
        t = self.expires.get(name)
        return None if t is None else time.time() + (t - time.monotonic())

    def add(self, name: str) -> None:
        """Serve one more store model (made while the server runs: Ollama's pull, create, copy)."""
        folder = self.store.require(name)
        if is_router(folder):
            raise BadRequest(f"{name} is a router: routers are served from the server's start", f"Restart the server with {name}.")
        with self._lock:
            self.backends[name] = pick_backend(folder, self.backend_choice)
            if name not in self.names:
                self.names.append(name)

    def in_use(self, name: str) -> str | None:
        """Why `name` cannot be taken out of service while the server runs (it is a router, part of one, an A/B arm,
        in a shared adapter group, or the base of an adapter served), or None."""
        in_router = {m for r in self.routers.values() for m in (r["small"], r["large"].get("store"))}
        arms = {a for s in self.splits.values() for a in s.arms}
        served_bases = {self.store.card(n).parent for n in self.backends if n != name and is_adapter(self.store.path(n))}
        for why, group in (("a router", self.routers), ("a router's model", in_router), ("an A/B split's arm", arms),
                           ("in a group of adapters sharing a base", self.groups), ("the base of an adapter served", served_bases)):
            if name in group:
                return why
        return None

    def drop(self, name: str, timeout: float = 60.0) -> None:
        """Stop serving `name` (Ollama's delete): its running requests finish (for up to `timeout` s)."""
        with self._lock:
            if (why := self.in_use(name)) is not None:
                raise BadRequest(f"{name} is {why} on this server", "Stop the server to remove it (slmkit models rm).")
            model = self._models.pop(name, None)
            self._served.pop(name, None)
            self.backends.pop(name, None)
            if name in self.names:
                self.names.remove(name)
        if model is not None:
            model.backend.scheduler.stop(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        for sched in {id(m.backend.scheduler): m.backend.scheduler for m in self._models.values()}.values():
            sched.stop(timeout)

    def loaded(self) -> list[str]:
        return list(self._models)


class BadRequest(SlmkitError):
    """A request the server refuses with 400 (limits, context window)."""


def check_inputs(texts: Sequence[str | Sequence[int]], most: int, verb: str) -> None:
    """A batch of inputs (texts, or lists of token ids, to embed or classify): non-empty, and at most `most`."""
    if not texts or any(not t for t in texts):
        raise BadRequest("input must be a non-empty string or list of non-empty strings", f"Send text to {verb}.")
    if len(texts) > most:
        raise BadRequest(f"{len(texts)} inputs are over this server's limit of {most} per request", "Send them in several requests.")
