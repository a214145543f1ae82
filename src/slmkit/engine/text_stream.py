"""Token ids in, text pieces out: incremental detokenization and stop strings, with no model involved."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDecoder:
    """Turn a growing list of token ids into text pieces without re-decoding everything each step.

    Decodes a short window (from `prefix` to the end) and emits what lies past the previously emitted text;
    holds back while the tail is an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            piece = now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""


class StopMatcher:
    """Cut generated text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Return the text that is safe to show now; sets `stopped` when a stop string completes."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation, release held-back text that never became a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
