"""How sure the small model was of its own answer, from the steps the decode loop already computed (no second
forward pass): the mean and the minimum token log-probability, and the mean entropy of the next-token
distribution. Entropy is taken over the `top` alternatives each step kept, with the rest of the probability mass as
one more outcome: a lower bound of the full entropy that orders answers the same way in practice (k >= 5)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from slmkit.engine.decode import Step

TOP_FOR_ENTROPY = 5  # alternatives per step the router asks the decode loop for
SIGNALS = ("mean_logprob", "min_logprob", "neg_entropy")  # higher = surer, for every one


@dataclass(frozen=True)
class Signals:
    mean_logprob: float
    min_logprob: float
    neg_entropy: float  # minus the mean entropy (nats), so that for every signal higher means surer
    tokens: int

    def get(self, name: str) -> float:
        if name not in SIGNALS:
            raise KeyError(f"unknown confidence signal {name!r}; signals: {', '.join(SIGNALS)}")
        return float(getattr(self, name))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def step_entropy(step: Step) -> float:
    """Entropy (nats) of one step's distribution over its kept alternatives plus the remaining mass."""
    probs = [math.exp(lp) for _, lp in step.top] or [math.exp(step.logprob)]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in [*probs, rest] if p > 0)


def signals_of(steps: Sequence[Step]) -> Signals:
    """Signals over the answer's tokens (a final EOS counts: stopping is part of the answer). An empty answer has
    no evidence of confidence: it scores lowest on every signal."""
    if not steps:
        return Signals(-math.inf, -math.inf, -math.inf, 0)
    lps = [s.logprob for s in steps]
    return Signals(sum(lps) / len(lps), min(lps), -sum(step_entropy(s) for s in steps) / len(steps), len(steps))
