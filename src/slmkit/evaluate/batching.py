"""Score many (ids, start) requests in length-sorted batches, with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence

from slmkit import progress
from slmkit.engine.backend import Backend, TokenScores

Request = tuple[Sequence[int], int]


def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_batch: int) -> list[list[int]]:
    """Group request indices, longest first, so each padded batch holds at most max_tokens token slots."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest first: the first sets the width
        if current and ((len(current) + 1) * width > max_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_requests(
    backend: Backend, requests: Sequence[Request], *, description: str = "Scoring", max_tokens: int = 4096,
    max_batch: int = 32,
) -> list[TokenScores]:
    """Log-probabilities for every request, in the order given."""
    results: list[TokenScores | None] = [None] * len(requests)
    batches = plan_batches([len(ids) for ids, _ in requests], max_tokens=max_tokens, max_batch=max_batch)
    with progress.bar(description, total=len(requests)) as advance:
        for batch in batches:
            for i, scores in zip(batch, backend.score_batch([requests[i] for i in batch])):
                results[i] = scores
            advance(len(batch))
    return results  # type: ignore[return-value]
