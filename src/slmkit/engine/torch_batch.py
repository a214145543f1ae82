"""Continuous batching on PyTorch: where the running batch's KV lives (the scheduler's batch store).

Llama-layout models keep it in a preallocated slot cache stepped by the lean forward of lean_forward (`SlotKV`);
any other causal LM transformers runs keeps it in a left-padded transformers cache (`DynamicKV`). Same interface
as llama.cpp's (`llamacpp_batch.LlamaCppSlots`): prefill, join, step, keep, clear.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import TYPE_CHECKING, Any

import torch

from slmkit.engine.kv_cache import KV, cache_from, cut, join_rows, kv_of, select_rows
from slmkit.engine.lean_forward import LeanForward
from slmkit.layers.integer import same_kernels_as

if TYPE_CHECKING:
    from slmkit.engine.torch_backend import TorchBackend


class SlotKV:
    """The running batch in a preallocated slot cache, stepped by the lean Llama forward (rows 0..n-1 run)."""

    context: int | None = None  # no per-slot limit beyond the model's context
    bursts = True
    chunked = True  # prefill takes `between` and `chunk` (chunked prefill)

    def __init__(self, fast: LeanForward, slots: int) -> None:
        self.fast = fast
        self.checks = fast.kernels is not None  # rows by slot run on slmkit's decode kernels only
        self.cache = fast.new_cache(slots)
        self.rows = 0
        self._pending: list[int] = []  # the slots prefilled and not yet joined, in order

    def prefill(self, ids: list[int], reused: int, kv: KV | None, *, export: bool,
                between: Callable[[], None] | None = None, chunk: int = 0, adapter: int = 0) -> tuple[torch.Tensor, KV | None]:
        """Prefill `ids` (the first `reused` already in `kv`) into the next free slot; its KV copied out if asked.

        Chunked prefill: with `chunk`, the prompt goes in pieces of that many tokens and `between()` runs after
        each piece but the last (the scheduler steps the running rows there, so a long prompt does not stall them;
        rows that finish meanwhile may move, so the new row is moved to its place at join). `adapter`: the LoRA
        adapter the row runs with (LeanForward.add_adapter; 0: the base alone)."""
        slot = self.rows
        self._pending = [slot]
        self.cache.load(slot, cut(kv, reused) if kv else [])
        self.cache.adapter[slot] = adapter
        rest = ids[reused:]
        pieces = [rest[i:i + chunk] for i in range(0, len(rest), chunk)] if chunk and between else [rest]
        for i, piece in enumerate(pieces):
            logits = self.fast.forward(self.cache, torch.tensor([piece]), first=slot)[0]
            if i < len(pieces) - 1:
                between()
        return logits, self.cache.export(slot) if export else None

    def prefill_many(self, items: list[tuple[list[int], int, KV | None, int]], *, export: bool) -> list[tuple[torch.Tensor, KV | None]]:
        """Prefill several prompts (ids, reused, kv, adapter) whose uncached parts have the same length into the next
        free slots with one forward (a burst of requests sharing a cached prefix: one step instead of one each).
        Returns each prompt's (last logits, its KV if asked); join() or drop() each, in order."""
        first = self.rows
        for j, (_, reused, kv, adapter) in enumerate(items):
            self.cache.load(first + j, cut(kv, reused) if kv else [])
            self.cache.adapter[first + j] = adapter
        rest = torch.tensor([ids[reused:] for ids, reused, _, _ in items])  # (n, T)
        logits = self.fast.forward(self.cache, rest, first=first)  # (n, V)
        self._pending = list(range(first, first + len(items)))
        return [(logits[j], self.cache.export(first + j) if export else None) for j in range(len(items))]

    def join(self) -> None:
        slot = self._pending.pop(0)
        if slot != self.rows:  # running rows left while it was prefilled in pieces, or one prefilled before it dropped
            self.cache.move(slot, self.rows)
        self.rows += 1

    def drop(self) -> None:
        """The next prefilled prompt does not join (it finished at its first token, or was cancelled)."""
        self._pending.pop(0)

    def step(self, last: list[int]) -> torch.Tensor:
        return self.fast.forward(self.cache, torch.tensor(last, dtype=torch.long)[:, None])

    def check(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Every running row's tokens as one-token rows of its slot in one forward, each layer on the kernel a plain
        step of the running batch takes (so a row's logits are those plain steps would give)."""
        slots = [r for r, tokens in enumerate(rows) for _ in tokens]
        with same_kernels_as(len(rows)):
            logits = self.fast.forward(self.cache, torch.tensor([t for tokens in rows for t in tokens])[:, None], slots=slots)
        return list(logits.split([len(tokens) for tokens in rows]))

    def forget(self, row: int, n: int) -> None:
        self.cache.drop(row, n)

    def keep(self, rows: list[int]) -> list[int]:
        """Keep `rows`, filling each freed slot with the last running row; returns the new order."""
        order = list(range(self.rows))
        for gone in sorted(set(order) - set(rows), reverse=True):
            last = len(order) - 1
            if gone != last:
                self.cache.move(last, gone)
                order[gone] = order[last]
            order.pop()
        self.rows = len(order)
        return order

    def clear(self) -> None:
        self.rows = 0
        self._pending = []

    def close(self) -> None:
        """Nothing to free: the cache is ordinary tensors."""


class DynamicKV:
    """The running batch as a left-padded transformers DynamicCache (any causal LM transformers runs)."""

    context: int | None = None
    chunked = False
    bursts = False
    checks = False

    def __init__(self, backend: "TorchBackend") -> None:
        self.model = backend.model
        self.cache_arg = backend.cache_arg
        self.clear()

    def clear(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B,) next position id per row
        self.pending: tuple[Any, int] | None = None

    def close(self) -> None:
        self.clear()

    def prefill(self, ids: list[int], reused: int, kv: KV | None, *, export: bool) -> tuple[torch.Tensor, KV | None]:
        cache = cache_from(self.model.config, cut(kv, reused) if kv else [])
        new = torch.tensor([ids[reused:]], dtype=torch.long)  # (1, T_new)
        positions = torch.arange(reused, len(ids)).unsqueeze(0)  # (1, T_new)
        kw = {self.cache_arg: cache, "use_cache": True, "logits_to_keep": 1}
        logits = self.model(input_ids=new, position_ids=positions, **kw).logits[0, -1]
        self.pending = (cache, len(ids))
        return logits, kv_of(cache)

    def join(self) -> None:
        assert self.pending is not None
        cache, length = self.pending
        mask = torch.ones((1, length), dtype=torch.long)
        if self.cache is not None:
            kv, self.mask = join_rows(kv_of(self.cache), self.mask, kv_of(cache), mask)
            self.cache = cache_from(self.model.config, kv)
            self.positions = torch.cat([self.positions, torch.tensor([length])])
        else:
            self.cache, self.mask, self.positions = cache, mask, torch.tensor([length])
        self.pending = None

    def drop(self) -> None:
        """The prefilled row does not join: forget it."""
        self.pending = None

    def step(self, last: list[int]) -> torch.Tensor:
        rows = len(last)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)  # (B, T+1)
        kw = {self.cache_arg: self.cache, "use_cache": True, "logits_to_keep": 1}
        ids = torch.tensor(last, dtype=torch.long)[:, None]  # (B, 1)
        logits = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions.unsqueeze(1), **kw).logits[:, -1]
        self.positions = self.positions + 1
        return logits

    def keep(self, rows: list[int]) -> list[int]:
        if rows:
            kv, self.mask = select_rows(kv_of(self.cache), self.mask, rows)
            self.cache = cache_from(self.model.config, kv)
            self.positions = self.positions[torch.tensor(rows)]
        else:
            self.clear()
        return rows
