"""Drift watch: is today's traffic like the calibration set? Prompt lengths and the small model's confidence over a
sliding window, compared with the calibration set's by the population stability index (PSI over the reference's
deciles; < 0.1 stable, 0.1-0.25 moderate, > 0.25 a shift), and the escalation rate against the calibrated one.
Pure: the caller feeds observations and reads the values."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

PSI_WARN = 0.25
WINDOW = 200
BINS = 10
EPS = 1e-4


def edges_of(reference: Sequence[float], bins: int = BINS) -> list[float]:
    """Inner bin edges at the reference's quantiles (ties merged)."""
    xs = sorted(reference)
    if not xs:
        return []
    cuts = [xs[min(len(xs) - 1, int(len(xs) * q / bins))] for q in range(1, bins)]
    return sorted(set(cuts))


def shares(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect.bisect_right(edges, v)] += 1
    n = max(1, len(values))
    return [c / n for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index between two distributions over the same bins."""
    total = 0.0
    for e, a in zip(expected, actual):
        e, a = max(e, EPS), max(a, EPS)
        total += (a - e) * math.log(a / e)
    return total


@dataclass
class Reference:
    edges: list[float]
    expected: list[float]

    @classmethod
    def of(cls, values: Sequence[float], bins: int = BINS) -> "Reference":
        edges = edges_of(values, bins)
        return cls(edges, shares(values, edges))

    def as_dict(self) -> dict[str, list[float]]:
        return {"edges": self.edges, "expected": self.expected}


@dataclass
class DriftWatch:
    """Sliding windows of recent observations per signal, each compared with its reference."""

    references: dict[str, Reference]
    escalation_rate: float | None = None
    window: int = WINDOW
    warn_at: float = PSI_WARN
    _seen: dict[str, deque] = field(default_factory=dict)
    _escalated: deque = field(default_factory=deque)

    def observe(self, signal: str, value: float) -> None:
        if signal in self.references and math.isfinite(value):
            self._seen.setdefault(signal, deque(maxlen=self.window)).append(value)

    def observe_escalation(self, escalated: bool) -> None:
        if self._escalated.maxlen != self.window:
            self._escalated = deque(self._escalated, maxlen=self.window)
        self._escalated.append(1.0 if escalated else 0.0)

    def psi(self, signal: str) -> float | None:
        """PSI of the window against the reference; None until the window holds a quarter of its size."""
        seen = self._seen.get(signal)
        if not seen or len(seen) < max(10, self.window // 4):
            return None
        ref = self.references[signal]
        return psi(ref.expected, shares(list(seen), ref.edges))

    def escalation_shift(self) -> float | None:
        """PSI of the window's escalated / kept shares against the calibrated ones."""
        if self.escalation_rate is None or len(self._escalated) < max(10, self.window // 4):
            return None
        r = sum(self._escalated) / len(self._escalated)
        return psi([1 - self.escalation_rate, self.escalation_rate], [1 - r, r])

    def drifted(self) -> dict[str, float]:
        """Signals (and "escalation") whose PSI is past the warning level now."""
        out = {s: v for s in self.references if (v := self.psi(s)) is not None and v > self.warn_at}
        e = self.escalation_shift()
        if e is not None and e > self.warn_at:
            out["escalation"] = e
        return out
