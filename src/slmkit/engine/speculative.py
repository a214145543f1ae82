"""Prompt-lookup drafting for speculative decoding (pure; no second model): the tokens that followed the latest earlier
occurrence of the sequence's last n-gram are proposed as the next ones; the model checks them all in one forward pass
(engine/decode.py) and keeps the longest prefix it would have produced itself. Pays where the output repeats its input
(summaries, edits, code changes, answers quoting a passage).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it has no earlier occurrence


def lookup(history: Sequence[int], draft: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `draft` tokens that followed the latest earlier occurrence of `history`'s last n-gram (n = max_ngram
    down to 1); [] when none occurs."""
    n_hist = len(history)
    for n in range(min(max_ngram, n_hist - 1), 0, -1):
        tail, last = list(history[n_hist - n:]), history[-1]
        for start in range(n_hist - n - 1, -1, -1):  # latest first; the tail itself is excluded
            if history[start + n - 1] == last and list(history[start:start + n]) == tail:  # (one int compare mostly)
                following = list(history[start + n: start + n + draft])
                if following:
                    return following
    return []
