"""Prompt-lookup drafting for speculative decoding (pure; no second model): the tokens that followed the latest earlier
occurrence of the sequence's last n-gram are proposed as the next ones; the model checks them all in one forward pass
(engine/decode.py) and keeps the longest prefix it would have produced itself. Pays where the output repeats its input
(summaries, edits, code changes, answers quoting a passage); where it does not, the Throttle turns drafting off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it has no earlier occurrence
BACKOFF = (16, 256)  # plain tokens drafting pauses for after a losing check: the first pause, doubling up to the last
SMOOTHING = 0.3  # the weight of the newest measurement in the running seconds-per-token of each mode


class PromptLookup:
    """The drafts of one growing sequence: every n-gram (n <= max_ngram) indexed by where its latest occurrence ends,
    so a draft costs a few dictionary reads, not a scan of the history."""

    def __init__(self, history: Sequence[int] = (), max_ngram: int = MAX_NGRAM) -> None:
        self.history: list[int] = []
        self.max_ngram = max_ngram
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> the end (exclusive) of its latest earlier occurrence
        for token in history:
            self.push(token)

    def push(self, token: int) -> None:
        """Append a token. The n-grams ending before it become earlier occurrences, followed by it."""
        h, n_hist = self.history, len(self.history)
        for n in range(1, min(self.max_ngram, n_hist) + 1):
            self._ends[tuple(h[n_hist - n:])] = n_hist
        h.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last n-gram (the longest n that
        occurred before, n = max_ngram down to 1); [] when none did."""
        h = self.history
        for n in range(min(self.max_ngram, len(h) - 1), 0, -1):
            end = self._ends.get(tuple(h[len(h) - n:]))
            if end is not None:
                return h[end: end + limit]
        return []


def lookup(history: Sequence[int], draft: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `draft` tokens that followed the latest earlier occurrence of `history`'s last n-gram; [] when none does."""
    return PromptLookup(history, max_ngram).draft(draft)


@dataclass
class Throttle:
    """When drafting pays, from what each mode costs on this machine and this text: the running seconds per token of
    plain steps and of checks (a check makes its kept drafts and the next token's logits), each including its lookup.
    A check slower per token than plain steps pauses drafting for BACKOFF[0] plain tokens, doubling while checks keep
    losing (up to BACKOFF[1]); a winning one resets the pause. Greedy text does not depend on it (a check's rows
    equal one-token steps), nor does sampling's distribution."""

    step_s: float | None = None  # seconds per token, plain steps
    check_s: float | None = None  # seconds per token made, checks
    paused: int = 0  # plain tokens left before drafting again
    backoff: int = BACKOFF[0]
    checks: int = 0
    drafted: int = 0
    accepted: int = 0

    def allow(self) -> bool:
        """Draft now? Not while paused, nor after a first check until a plain step has been timed to compare with."""
        return self.paused == 0 and not (self.checks and self.step_s is None)

    def plain(self, seconds: float) -> None:
        """A plain step took `seconds`."""
        self.step_s = _smooth(self.step_s, seconds)
        self.paused = max(0, self.paused - 1)

    def checked(self, seconds: float, drafted: int, kept: int) -> None:
        """A check of `drafted` tokens kept `kept` of them in `seconds` (it made kept + 1 tokens' worth of steps)."""
        self.checks, self.drafted, self.accepted = self.checks + 1, self.drafted + drafted, self.accepted + kept
        self.check_s = _smooth(self.check_s, seconds / (kept + 1))
        if self.step_s is None:
            return
        if self.check_s > self.step_s:
            self.paused, self.backoff = self.backoff, min(2 * self.backoff, BACKOFF[1])
            self.check_s = None  # judged afresh when drafting resumes
        else:
            self.backoff = BACKOFF[0]

    @property
    def acceptance(self) -> float | None:
        """Drafted tokens kept, as a fraction (None before any check)."""
        return self.accepted / self.drafted if self.drafted else None


def _smooth(running: float | None, new: float) -> float:
    return new if running is None else (1 - SMOOTHING) * running + SMOOTHING * new
