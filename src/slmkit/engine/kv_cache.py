"""KV-cache tensors for batching: read a transformers cache's per-layer tensors, build one, join rows.

Shapes: one layer's keys or values are (B, H_kv, T, D). Rows of a batch are left-padded to a common T and the
padding is masked out by the attention mask, so sequences of different lengths decode together.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KV = list[tuple[torch.Tensor, torch.Tensor]]


def kv_of(cache: Any) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(config: Any, kv: KV) -> Any:
    """A transformers DynamicCache holding exactly these tensors."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the time axis (dim 2) on the left with zeros to `length`.  # (B, H, T, D) -> (B, H, length, D)"""
    return F.pad(t, (0, 0, length - t.shape[2], 0)) if t.shape[2] < length else t


def join_rows(a: KV, a_mask: torch.Tensor, b: KV, b_mask: torch.Tensor) -> tuple[KV, torch.Tensor]:
    """Stack two batches (each left-padded) into one, padding the shorter on the left.  masks: (B, T)"""
    length = max(a_mask.shape[1], b_mask.shape[1])
    kv = [(torch.cat([left_pad(ka, length), left_pad(kb, length)]), torch.cat([left_pad(va, length), left_pad(vb, length)]))
          for (ka, va), (kb, vb) in zip(a, b)]
    mask = torch.cat([F.pad(a_mask, (length - a_mask.shape[1], 0)), F.pad(b_mask, (length - b_mask.shape[1], 0))])
    return kv, mask


def select_rows(kv: KV, mask: torch.Tensor, rows: list[int]) -> tuple[KV, torch.Tensor]:
    """Keep `rows`, then drop leading columns that are padding for every kept row."""
    idx = torch.tensor(rows, dtype=torch.long)
    mask = mask[idx]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    return [(k[idx, :, start:], v[idx, :, start:]) for k, v in kv], mask[:, start:]


def cut(kv: KV, length: int) -> KV:
    """The first `length` positions of per-layer keys/values."""
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


class PrefixCache:
    """KV of recent prompts, so a new prompt that starts the same way (a system prompt, a chat history) skips
    recomputing the shared part. Bounded by total cached tokens; least recently used entries go first.
    Entries are whatever the batch store exports (per-layer tensors, or llama.cpp's sequence state); the store
    that loads one keeps only the shared length."""

    def __init__(self, max_tokens: int = 32768) -> None:
        self.max_tokens = max_tokens
        self.entries: list[tuple[list[int], Any]] = []  # most recent last
        self.lookups = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.reused_tokens = 0

    def _longest(self, ids: list[int]) -> tuple[int, int]:
        """(length, entry index) of the longest cached prefix of ids, at most len(ids) - 1; (0, -1) if none."""
        best, best_i = 0, -1
        for i, (cached, _) in enumerate(self.entries):
            n = 0
            limit = min(len(cached), len(ids) - 1)
            while n < limit and cached[n] == ids[n]:
                n += 1
            if n > best:
                best, best_i = n, i
        return best, best_i

    def peek(self, ids: list[int]) -> int:
        """How many tokens of ids a lookup would reuse, without counting it or touching the entries' order."""
        return self._longest(ids)[0]

    def lookup(self, ids: list[int]) -> tuple[int, Any]:
        """Longest cached prefix of ids (at most len(ids) - 1, so one token is always computed) and the entry
        holding it (which may be longer)."""
        self.lookups += 1
        self.prompt_tokens += len(ids)
        best, best_i = self._longest(ids)
        if best_i < 0:
            return 0, None
        self.hits += 1
        self.reused_tokens += best
        entry = self.entries.pop(best_i)
        self.entries.append(entry)
        return best, entry[1]

    def store(self, ids: list[int], kv: Any) -> None:
        self.entries = [e for e in self.entries if e[0] != ids]
        self.entries.append((list(ids), kv))
        while sum(len(e[0]) for e in self.entries) > self.max_tokens and len(self.entries) > 1:
            self.entries.pop(0)

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens served from the cache."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
