"""Calibration math, pure: the quality-versus-escalation curve of a score, random routing as the baseline, the
area between them, and the threshold that meets a quality target or an escalation budget.

Per dev item i: small_q[i] and large_q[i] are the two models' quality (1/0 for right/wrong, or a ROUGE-L in [0, 1]),
score[i] how sure the policy is that the small model's answer will do (higher = keep it on the small model).
Escalating every item whose score is below a threshold t sends a share s(t) of traffic to the large model and
yields quality q(t) = mean(large_q where escalated, small_q elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from slmkit.errors import SlmkitError


@dataclass(frozen=True)
class Point:
    threshold: float  # escalate where score < threshold
    escalated: float  # share of items sent to the large model
    quality: float


def curve(small_q: Sequence[float], large_q: Sequence[float], score: Sequence[float]) -> list[Point]:
    """One point per distinct threshold, from escalating nothing to escalating everything."""
    n = len(score)
    if n == 0 or len(small_q) != n or len(large_q) != n:
        raise SlmkitError("calibration needs the same number (> 0) of small and large results and scores")
    order = sorted(range(n), key=lambda i: score[i])
    total = float(sum(small_q))
    points = [Point(score[order[0]], 0.0, total / n)]
    i = 0
    while i < n:  # escalate the next group of tied scores together
        j = i
        while j < n and score[order[j]] == score[order[i]]:
            total += large_q[order[j]] - small_q[order[j]]
            j += 1
        t = score[order[j]] if j < n else math.nextafter(score[order[-1]], math.inf)
        points.append(Point(t, j / n, total / n))
        i = j
    return points


def random_quality(small_q: Sequence[float], large_q: Sequence[float], share: float) -> float:
    """Quality of escalating a random `share` of the traffic (in expectation)."""
    s, l_ = sum(small_q) / len(small_q), sum(large_q) / len(large_q)
    return s + share * (l_ - s)


def area_over_random(points: Sequence[Point], small_q: Sequence[float], large_q: Sequence[float]) -> float:
    """Area between the curve and random routing over the whole escalation range (trapezoids; > 0: better)."""
    area = 0.0
    for a, b in zip(points, points[1:]):
        da = a.quality - random_quality(small_q, large_q, a.escalated)
        db = b.quality - random_quality(small_q, large_q, b.escalated)
        area += (b.escalated - a.escalated) * (da + db) / 2
    return area


def beats_random_everywhere(points: Sequence[Point], small_q: Sequence[float], large_q: Sequence[float], tol: float = 1e-9) -> bool:
    """True when no point of the curve lies below random routing (the ends coincide with it by construction)."""
    return all(p.quality >= random_quality(small_q, large_q, p.escalated) - tol for p in points)


def pick(points: Sequence[Point], large_quality: float, *, target: float | None = None, max_escalation: float | None = None) -> Point:
    """The point to serve: the least escalation whose quality reaches `target` x the large model's (if none
    does, the best quality), or the best quality within an escalation budget (ties: less escalation)."""
    if (target is None) == (max_escalation is None):
        raise SlmkitError("give exactly one of --target and --max-escalation", "For example --target 0.95, or --max-escalation 0.3.")
    if target is not None:
        if not 0 < target <= 1.5:
            raise SlmkitError(f"--target {target} is out of range", "A share of the large model's quality, such as 0.95.")
        ok = [p for p in points if p.quality >= target * large_quality - 1e-12]
        return min(ok, key=lambda p: p.escalated) if ok else max(points, key=lambda p: (p.quality, -p.escalated))
    assert max_escalation is not None
    if not 0 <= max_escalation <= 1:
        raise SlmkitError(f"--max-escalation {max_escalation} is out of range", "A share between 0 and 1, such as 0.3.")
    within = [p for p in points if p.escalated <= max_escalation + 1e-12]
    return max(within, key=lambda p: (p.quality, -p.escalated))


def at_threshold(points: Sequence[Point], threshold: float, score: Sequence[float]) -> Point:
    """The point a user-given threshold lands on; a threshold outside the scores' range is refused."""
    lo, hi = min(score), max(score)
    if not lo <= threshold <= hi:
        raise SlmkitError(f"threshold {threshold} is outside the dev set's score range [{lo:.4f}, {hi:.4f}]",
                          "Pick one inside it, or leave --threshold out and give --target or --max-escalation.")
    below = sum(1 for s in score if s < threshold) / len(score)
    return min(points, key=lambda p: abs(p.escalated - below))
