"""Prometheus metrics for the server, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmkit_requests", "HTTP API requests", ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("slmkit_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("slmkit_completion_tokens", "Tokens generated", ["model"], registry=r)
        # speculative decoding: the checks run, the drafted tokens they checked and the ones kept (acceptance = kept / drafted)
        self.speculative_checks = Counter("slmkit_speculative_checks", "Speculative checks run", ["model"], registry=r)
        self.speculative_drafted = Counter("slmkit_speculative_drafted_tokens", "Drafted tokens checked", ["model"], registry=r)
        self.speculative_accepted = Counter("slmkit_speculative_accepted_tokens", "Drafted tokens kept", ["model"], registry=r)
        self.ttft = Histogram("slmkit_time_to_first_token_seconds", "Time to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slmkit_inter_token_latency_seconds", "Time between streamed tokens", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("slmkit_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r)
        self.batch_size = Gauge("slmkit_running_batch_size", "Sequences in the running batch", ["model"], registry=r)
        # routing (slmkit.route): decisions, latencies per side, calls to the large target, drift; the cache; A/B arms
        self.route_decisions = Counter("slmkit_route_decisions", "Routed requests by who answered and why", ["route", "answered_by", "reason"], registry=r)
        self.route_latency = Histogram("slmkit_route_latency_seconds", "Time spent on each side of a routed request", ["route", "side"], buckets=LATENCY_BUCKETS, registry=r)
        self.route_large_calls = Counter("slmkit_route_large_calls", "Calls to the large target by outcome", ["route", "outcome"], registry=r)
        self.drift_psi = Gauge("slmkit_route_drift_psi", "Population stability index of recent traffic against the calibration set", ["route", "signal"], registry=r)
        self.cache_requests = Counter("slmkit_cache_requests", "Response cache lookups by result", ["model", "result"], registry=r)
        self.cache_saved_tokens = Counter("slmkit_cache_saved_tokens", "Completion tokens served from the response cache", ["model"], registry=r)
        self.cache_entries = Gauge("slmkit_cache_entries", "Answers held in the response cache", ["model"], registry=r)
        self.ab_requests = Counter("slmkit_ab_requests", "Requests per arm of an A/B split", ["split", "arm"], registry=r)
        self.prefix_hit_rate = Gauge("slmkit_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache", ["model"], registry=r)

    def watch(self, model: str, queue_depth: Callable[[], float], batch_size: Callable[[], float], hit_rate: Callable[[], float]) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.labels(model).set_function(queue_depth)
        self.batch_size.labels(model).set_function(batch_size)
        self.prefix_hit_rate.labels(model).set_function(hit_rate)

    def unwatch(self, model: str) -> None:
        """A freed model's gauges go (their functions held its scheduler, and so its weights)."""
        for gauge in (self.queue_depth, self.batch_size, self.prefix_hit_rate):
            try:
                gauge.remove(model)
            except KeyError:
                pass
