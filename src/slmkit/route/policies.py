"""Routing policies: small pure pieces, each answering "escalate?" with a reason.

Two moments to decide:
- before generating (`when == "before"`): rules on the prompt (length, keywords, a regex) and the trained router
  (a classifier on the small model's embedding of the prompt);
- after the small model answered (`when == "after"`): its confidence (mean or minimum token log-probability, or
  minus the entropy) below a threshold.
A `Chain` asks its policies in order and takes the first that escalates (rules first, then a router or the cascade).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slmkit.errors import SlmkitError
from slmkit.route.signals import SIGNALS, Signals


@dataclass(frozen=True)
class Decision:
    escalate: bool
    reason: str  # short and stable: a metrics label ("confidence", "keyword", "length", "router", "confident", ...)
    policy: str
    score: float | None = None  # the value compared with the threshold, where there is one
    detail: str = ""


class RouteConfigError(SlmkitError):
    pass


@dataclass(frozen=True)
class Confidence:
    """Escalate when the small model's `signal` on its own answer is below `threshold` (decide-after)."""

    threshold: float
    signal: str = "mean_logprob"
    name: str = "confidence"
    when: str = "after"

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise RouteConfigError(f"unknown confidence signal {self.signal!r}", f"Signals: {', '.join(SIGNALS)}")

    def decide(self, prompt: str, *, embedding: Sequence[float] | None = None, signals: Signals | None = None) -> Decision:
        if signals is None:
            raise RouteConfigError("the confidence policy needs the small model's answer", "Decide after generating.")
        value = signals.get(self.signal)
        low = value < self.threshold
        return Decision(low, "confidence" if low else "confident", self.name, value,
                        f"{self.signal} {value:.3f} {'<' if low else '>='} {self.threshold:.3f}")


@dataclass(frozen=True)
class Rules:
    """Escalate prompts longer than `max_chars`, containing any of `keywords` (case-insensitive, whole words) or
    matching `pattern` (decide-before)."""

    max_chars: int | None = None
    keywords: tuple[str, ...] = ()
    pattern: str | None = None
    name: str = "rules"
    when: str = "before"
    _compiled: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_chars is not None and self.max_chars < 1:
            raise RouteConfigError(f"max_chars must be >= 1, got {self.max_chars}", "Fix the rule.")
        words = [re.escape(k.strip()) for k in self.keywords if k.strip()]
        try:
            kw = re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
            rx = re.compile(self.pattern) if self.pattern else None
        except re.error as exc:
            raise RouteConfigError(f"the rule's regex {self.pattern!r} does not compile: {exc}", "Fix the pattern.") from exc
        object.__setattr__(self, "_compiled", (kw, rx))

    def decide(self, prompt: str, *, embedding: Sequence[float] | None = None, signals: Signals | None = None) -> Decision:
        kw, rx = self._compiled
        if self.max_chars is not None and len(prompt) > self.max_chars:
            return Decision(True, "length", self.name, float(len(prompt)), f"{len(prompt)} characters > {self.max_chars}")
        if kw is not None and (m := kw.search(prompt)):
            return Decision(True, "keyword", self.name, None, f"keyword {m.group(0)!r}")
        if rx is not None and (m := rx.search(prompt)):
            return Decision(True, "regex", self.name, None, f"matches {self.pattern!r}")
        return Decision(False, "no_rule", self.name)


@dataclass(frozen=True)
class Classifier:
    """Logistic regression on standardized features: p(the small answer is as good as the large one | prompt embedding)."""

    weight: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def prob(self, x: Sequence[float]) -> float:
        v = (torch.tensor(x, dtype=torch.float64) - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)
        return float(torch.sigmoid(v @ torch.tensor(self.weight, dtype=torch.float64) + self.bias))

    def as_dict(self) -> dict[str, Any]:
        return {"weight": list(self.weight), "bias": self.bias, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Classifier":
        return cls(tuple(d["weight"]), float(d["bias"]), tuple(d["mean"]), tuple(d["std"]))


def fit_classifier(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1.0, steps: int = 200) -> Classifier:
    """Fit logistic regression to features x (N, D) and labels y (N,) in {0, 1} with an L2 penalty (full-batch
    L-BFGS; deterministic). Standardization is part of the model."""
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise RouteConfigError("the router needs at least two labelled prompts", "Give a larger dev set.")
    if len(set(y.tolist())) < 2:
        raise RouteConfigError("every dev prompt has the same label (the small model is always right, or always wrong)",
                               "A trained router needs both kinds: give a larger or more varied dev set.")
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std  # (N, D)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w) / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return Classifier(tuple(w.detach().tolist()), float(b.detach()), tuple(mean.tolist()), tuple(std.tolist()))


@dataclass(frozen=True)
class Router:
    """Escalate when the classifier's p(small answer good enough) for the prompt is below `threshold` (decide-before)."""

    classifier: Classifier
    threshold: float
    name: str = "router"
    when: str = "before"

    def decide(self, prompt: str, *, embedding: Sequence[float] | None = None, signals: Signals | None = None) -> Decision:
        if embedding is None:
            raise RouteConfigError("the trained router needs the prompt's embedding", "Embed the prompt with the small model.")
        p = self.classifier.prob(embedding)
        low = p < self.threshold
        return Decision(low, "router" if low else "router_confident", self.name, p,
                        f"p(small good enough) {p:.3f} {'<' if low else '>='} {self.threshold:.3f}")


@dataclass(frozen=True)
class Chain:
    """Policies asked in order; the first that escalates decides. Those that decide before generating come first."""

    policies: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.policies:
            raise RouteConfigError("a route needs at least one policy", "Add rules, a router or a confidence threshold.")

    @property
    def before(self) -> tuple[Any, ...]:
        return tuple(p for p in self.policies if p.when == "before")

    @property
    def after(self) -> tuple[Any, ...]:
        return tuple(p for p in self.policies if p.when == "after")

    @property
    def needs_embedding(self) -> bool:
        return any(isinstance(p, Router) for p in self.policies)

    def decide_before(self, prompt: str, embedding: Sequence[float] | None = None) -> Decision | None:
        for p in self.before:
            d = p.decide(prompt, embedding=embedding)
            if d.escalate:
                return d
        return None

    def decide_after(self, prompt: str, signals: Signals) -> Decision | None:
        for p in self.after:
            d = p.decide(prompt, signals=signals)
            if d.escalate:
                return d
        return None


def policy_from_dict(d: dict[str, Any]) -> Any:
    kind = d.get("kind")
    if kind == "confidence":
        return Confidence(float(d["threshold"]), d.get("signal", "mean_logprob"))
    if kind == "rules":
        return Rules(d.get("max_chars"), tuple(d.get("keywords") or ()), d.get("pattern"))
    if kind == "router":
        return Router(Classifier.from_dict(d["classifier"]), float(d["threshold"]))
    raise RouteConfigError(f"unknown policy kind {kind!r}", "Kinds: confidence, rules, router.")


def policy_to_dict(p: Any) -> dict[str, Any]:
    if isinstance(p, Confidence):
        return {"kind": "confidence", "threshold": p.threshold, "signal": p.signal}
    if isinstance(p, Rules):
        return {"kind": "rules", "max_chars": p.max_chars, "keywords": list(p.keywords), "pattern": p.pattern}
    if isinstance(p, Router):
        return {"kind": "router", "threshold": p.threshold, "classifier": p.classifier.as_dict()}
    raise RouteConfigError(f"cannot save policy {p!r}")
