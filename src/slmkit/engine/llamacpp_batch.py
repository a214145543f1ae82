"""Continuous batching on llama.cpp: the running batch as sequences of one multi-sequence llama.cpp context.

llama-cpp-python's own server decodes one request at a time; llama.cpp itself can decode many sequences in
one `llama_decode` call (each token tagged with its sequence id and position). Here every batch slot is a
sequence id with its own part of the KV cache (`kv_unified` off: a slot's context is the context / slots,
and attention never scans other slots' cells), so a step for B running rows is one call with B tokens.
Running rows always hold slots 0..B-1, in order (a leaving row's slot takes the last row's sequence): llama.cpp
splits a batch over separate KV streams into one pass per run of consecutive sequence ids, so gaps or
disorder would turn one step into several (measured: 2-3x slower steps after requests come and go).
Same interface as the PyTorch slot cache (`scheduler.SlotKV`): prefill, join, step, keep, clear. The prefix
cache holds a slot's KV as llama.cpp's own per-sequence state blob, restored into a new slot and cut to the
shared length.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from typing import TYPE_CHECKING

from slmkit.config import settings
from slmkit.errors import SlmkitError

if TYPE_CHECKING:  # the backend imports this module when asked for a batch; only the type is needed here
    from slmkit.engine.llamacpp_backend import LlamaCppBackend

CHUNK = 512  # prompt tokens per llama_decode call while prefilling
DEFAULT_CONTEXT = 2048  # tokens per batch slot (llama.cpp allocates the KV up front: slots x context)


class LlamaCppSlots:
    """Sequences of one llama.cpp context, one per batch slot; running row i is sequence (slot) i."""

    chunked = False  # a prompt is decoded whole
    bursts = False  # one prefill per request
    checks = False  # no speculative checks

    def __init__(self, backend: "LlamaCppBackend", slots: int, context_per_slot: int | None = None) -> None:
        import llama_cpp as L

        context_per_slot = min(context_per_slot or DEFAULT_CONTEXT, backend.trained_context)
        self._L = L
        params = L.llama_context_default_params()
        params.n_ctx = slots * context_per_slot
        params.n_seq_max = slots
        params.n_batch = params.n_ubatch = max(CHUNK, slots)
        params.kv_unified = False
        # flash attention: 15% faster steps at 16 rows here; logits differ from the plain path's by ~1e-3
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        # llama.cpp's default is 4 threads; more threads than cores makes its spinning barriers crawl
        params.n_threads = params.n_threads_batch = backend.threads or settings().threads
        self.ctx = L.llama_init_from_model(backend.llm.model, params)
        if not self.ctx:
            raise SlmkitError(f"llama.cpp could not make a context for {slots} x {context_per_slot} tokens",
                              "Lower --max-batch or --context.")
        self.mem = L.llama_get_memory(self.ctx)
        self.context = min(int(L.llama_n_ctx_seq(self.ctx)), context_per_slot)  # llama.cpp may round up
        self.vocab = backend.vocab_size
        self.batch = L.llama_batch_init(params.n_batch, 0, 1)
        self.slots = slots
        self.lens = [0] * slots  # tokens in each slot's KV
        self.rows = 0  # running rows, in slots 0..rows-1

    def close(self) -> None:
        if self.ctx:
            self._L.llama_batch_free(self.batch)
            self._L.llama_free(self.ctx)
            self.ctx = None

    # ---- the scheduler's interface ------------------------------------------------------------------------
    def prefill(self, ids: list[int], reused: int, state: bytes | None, *, export: bool) -> tuple[torch.Tensor, bytes | None]:
        """Prefill `ids` (the first `reused` restored from `state`) into a free slot; return its last logits
        and, if asked, the slot's state for the prefix cache."""
        if len(ids) > self.context:
            raise SlmkitError(f"{len(ids)} prompt tokens exceed the {self.context}-token context of a batch slot",
                              "Shorten the prompt, or serve with a larger --context.")
        slot = self.rows
        self._clear_slot(slot)
        if state is not None and reused:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if not self._L.llama_state_seq_set_data(self.ctx, buf, len(state), slot):
                reused = 0  # not restorable: compute the whole prompt
            else:
                self._L.llama_memory_seq_rm(self.mem, slot, reused, -1)
        self.lens[slot] = reused
        rest = ids[reused:]
        for start in range(0, len(rest), CHUNK):
            part = rest[start : start + CHUNK]
            for j, token in enumerate(part):
                self._put(j, token, self.lens[slot] + j, slot, start + j == len(rest) - 1)
            self._decode(len(part))
            self.lens[slot] += len(part)
        return self._logits(1)[0], self._state(slot) if export else None

    def join(self) -> None:
        self.rows += 1

    def drop(self) -> None:
        """Nothing to undo: the next prefill clears the slot."""

    def step(self, last: list[int]) -> torch.Tensor:
        """One token for every running row, all in one llama_decode call; logits (B, V)."""
        for slot, token in enumerate(last):
            if self.lens[slot] >= self.context:
                raise SlmkitError(f"a sequence reached the {self.context}-token context of its batch slot",
                                  "Ask for fewer tokens, or serve with a larger --context.")
            self._put(slot, token, self.lens[slot], slot, True)
        self._decode(len(last))
        for slot in range(len(last)):
            self.lens[slot] += 1
        return self._logits(len(last))

    def keep(self, rows: list[int]) -> list[int]:
        """Keep `rows`, moving the last running sequence into each freed slot; returns the new order."""
        order = list(range(self.rows))
        for gone in sorted(set(order) - set(rows), reverse=True):
            last = len(order) - 1
            self._clear_slot(gone)
            if gone != last:
                self._L.llama_memory_seq_cp(self.mem, last, gone, -1, -1)
                self.lens[gone] = self.lens[last]
                self._clear_slot(last)
                order[gone] = order[last]
            order.pop()
        self.rows = len(order)
        return order

    def clear(self) -> None:
        self._L.llama_memory_clear(self.mem, True)
        self.lens = [0] * self.slots
        self.rows = 0

    # ---- llama.cpp calls --------------------------------------------------------------------------------
    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    def _decode(self, n: int) -> None:
        self.batch.n_tokens = n
        rc = self._L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise SlmkitError(f"llama_decode failed (code {rc})", "The KV cache may be full: lower --max-batch or raise --context.")

    def _logits(self, rows: int) -> torch.Tensor:
        """The last decode's logits, (rows, V), copied out of llama.cpp's buffer (the next decode reuses it)."""
        ptr = self._L.llama_get_logits(self.ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(rows, self.vocab)).copy())

    def _state(self, slot: int) -> bytes:
        size = self._L.llama_state_seq_get_size(self.ctx, slot)
        buf = (ctypes.c_uint8 * size)()
        written = self._L.llama_state_seq_get_data(self.ctx, buf, size, slot)
        return ctypes.string_at(buf, written)

    def _clear_slot(self, slot: int) -> None:
        self._L.llama_memory_seq_rm(self.mem, slot, -1, -1)
        self.lens[slot] = 0
