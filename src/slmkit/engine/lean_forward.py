"""A lean forward pass for decoder-only models over a preallocated, slot-based KV cache, by family (engine/families.py:
Llama, Mistral, Qwen2/2.5/3, Phi-3, Gemma 3 and their pruned, quantized and adapted children).

Why: at batch 1 a 135M model's weights take ~25 ms (int8) to ~70 ms (fp32) to go through the matmuls here, and
transformers' general forward adds 5-15 ms of per-layer Python and cache bookkeeping per token on top (mask
building, attention dispatch, `torch.cat` of every layer's cache each step); batched, its `x W^T` matmuls run MKL's
slow path on AMD CPUs (see `_linear`). This forward calls the model's own modules
(so float, int8 and int4 linears all work) and does the rest with a handful of tensor ops per layer.

Cache layout: keys and values of layer l are `k[l]`, `v[l]`: (slots, H_kv, capacity, D). Each slot holds one
sequence at its true positions 0..len-1 (no padding); a step for rows 0..n-1 writes each row's new key at its
own length and masks positions past it, so sequences of different lengths decode together. Capacity grows by
doubling. Grouped-query attention folds the query heads that share a KV head into the query-length axis, so
keys and values are never repeated. A sliding-window layer keeps every position too and reads only its window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from slmkit.engine.families import STATIC_ROPE_TYPES, Block, describe, unsupported
from slmkit.layers.multi_lora import LoraBank
from slmkit.layers.integer import Int8Linear, W4A8Linear, W8A8Linear, bucket_of, same_kernels_as
from slmkit.native import ops as native_ops

# queries per attention call in a long prefill: each piece sees only the keys up to it (a causal mask cannot make
# torch's CPU attention skip work; 512 tokens: 4.0 -> 3.0 ms per layer, bench/w8a8)
KV_BF16 = True  # integer models' KV cache in bfloat16 where slmkit's attention runs (False: their activations' dtype)
ATTENTION_PIECE = 128


def supports(model: Any) -> bool:
    """True for the families of engine/families.py (see `unsupported` there for what else it asks)."""
    return unsupported(model) is None


def fuse_linears(parts: list[Any]) -> Any | None:
    """One int8 layer computing `parts` (same input) side by side, their weights becoming views of its own;
    None otherwise. Float layers stay apart: fusing them saves no time here, and copying weights that were
    memory-mapped from safetensors would keep both copies resident (+270 MB RSS on the default model)."""
    for cls in (Int8Linear, W8A8Linear, W4A8Linear):  # w8a8, w4a8: the activations are also quantized once for all the parts
        if all(type(p) is cls and p.smooth is None for p in parts) and len({p.bias is None for p in parts}) == 1:
            return cls.concat(parts)
    return None


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`; a float nn.Linear with 2+ rows as (W @ x^T)^T, which MKL runs 1.2-3.5x faster than x @ W^T
    at 2-32 rows on AMD CPUs (bench/linear_forms.py -> bench/results/linear_forms.md; at 1 row both are alike).
    Same weights, same result, no extra memory."""
    if type(module) is not torch.nn.Linear:
        return module(x)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 1:
        return module(x)
    y = torch.mm(module.weight, x2.T).T
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as transformers' RMSNorms do (float32 input: torch's one fused op, the same result
    in one call instead of eight); the result in x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout.  x: (B, T, H, D); cos/sin: (B, T, 1, D)"""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class SlotCache:
    """Preallocated keys/values for up to `slots` sequences; `lens[s]` tokens are valid in slot s."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256) -> None:
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.lens = [0] * slots
        self.adapter = [0] * slots  # the LoRA adapter each slot's sequence runs with (0: none; see multi_lora.py)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (doubling, so growth is amortised)."""
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], cap, old.shape[4]))
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def load(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put per-layer (1, H_kv, T, D) keys/values (a cached prefix) at the start of `slot`."""
        t = kv[0][0].shape[2] if kv else 0
        self.reserve(t)
        for layer, (k, v) in enumerate(kv):
            self.k[layer, slot, :, :t] = k[0]
            self.v[layer, slot, :, :t] = v[0]
        self.lens[slot] = t

    def export(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one slot's valid keys/values as per-layer (1, H_kv, T, D) tensors (for the prefix cache)."""
        t = self.lens[slot]
        return [(self.k[layer, slot : slot + 1, :, :t].clone(), self.v[layer, slot : slot + 1, :, :t].clone())
                for layer in range(self.k.shape[0])]

    def drop(self, slot: int, n: int) -> None:
        """Forget the last n positions of `slot` (drafted tokens a speculative check rejected); what they wrote is
        overwritten by the next tokens."""
        self.lens[slot] -= n

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (to keep the running rows in slots 0..n-1)."""
        t = self.lens[src]
        self.k[:, dst, :, :t] = self.k[:, src, :, :t]
        self.v[:, dst, :, :t] = self.v[:, src, :, :t]
        self.lens[dst] = t
        self.adapter[dst] = self.adapter[src]


class LeanForward:
    """Forward passes of a transformers decoder model (its own modules and weights) over a SlotCache."""

    def __init__(self, model: Any) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"the lean forward cannot run this model: {why}")
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.block: Block = describe(model)
        fam = self.block.family
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.layers = list(self.inner.layers)
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.block.scale
        self.head_norms = self.block.head_norms
        # q/k/v and gate/up: the family's modules (Phi-3: one fused layer each); int8 ones as one kernel call (fewer,
        # larger calls: ~11% faster decode); float ones computed apart and concatenated (self.qkv[i] None)
        self.qkv_parts = [[l.get_submodule(n) for n in fam.qkv] for l in self.layers]
        self.gate_up_parts = [[l.get_submodule(n) for n in fam.gate_up] for l in self.layers]
        self.qkv = [parts[0] if len(parts) == 1 else fuse_linears(parts) for parts in self.qkv_parts]
        self.gate_up = [parts[0] if len(parts) == 1 else fuse_linears(parts) for parts in self.gate_up_parts]
        # each block's norm weights in the order it applies them (before attention, on its output, before the MLP, on
        # its output; None where the family has none), `offset + weight` made once where the family scales so
        self.norms = [tuple(self._norm_weight(getattr(l, name)) if name else None
                            for name in (fam.attn_norm, fam.attn_out_norm, fam.mlp_norm, fam.mlp_out_norm)) for l in self.layers]
        self.final_norm = self._norm_weight(self.inner.norm)
        # Qwen3, Gemma 3: each query and key head RMS-normed before the rotation (weights, eps)
        self.qk_norms = [(self._norm_weight(l.self_attn.q_norm), self._norm_weight(l.self_attn.k_norm),
                          float(getattr(l.self_attn.q_norm, "variance_epsilon", None) or l.self_attn.q_norm.eps))
                         for l in self.layers] if self.head_norms else []
        for m in [*self.qkv, *self.gate_up, *(l.self_attn.o_proj for l in self.layers), *(l.mlp.down_proj for l in self.layers),
                  model.lm_head]:
            if isinstance(m, (W8A8Linear, W4A8Linear)) and m._kernels is None:
                m.prepare()  # kernels and prepacked weights ready before the first request
        self.q_width = self.heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        self.mlp_width = cfg.intermediate_size
        dtype = self.inner.embed_tokens.weight.dtype
        self.dtype = dtype if dtype.is_floating_point else torch.float32  # activations and cache
        self.bank: LoraBank | None = None  # LoRA adapters served over this base, applied per row
        # slmkit's CPU kernels where they are built (native/decode.cpp): RMSNorm with its residual add and the MLP's
        # gate of every step; a decode step's rotary + cache write + attention in one call (2.4x torch's SDPA at 16 rows)
        self.kernels = native_ops() if self.dtype == torch.float32 else None
        # the KV cache: bfloat16 for models whose linears take int8 activations, where slmkit's attention reads it (half
        # the bytes a 16-row step's attention reads; its rounding is far below the activations' own), else self.dtype
        integer = any(isinstance(m, (W8A8Linear, W4A8Linear)) for m in self.qkv_parts[0])  # (fused ones stay this type)
        self.kv_dtype = torch.bfloat16 if self.kernels is not None and integer and KV_BF16 else self.dtype
        gates = {"silu": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul", "gelu_new": "gelu_tanh_mul"}
        self.gate_kernel = getattr(self.kernels, gates[self.block.act]) if self.kernels and self.block.act in gates else None
        self.step_weights, self.step_buckets = self._whole_step_weights()
        # what native.decode_step takes besides the weights, the same every step: its main rope table (the last layer's:
        # Gemma's global one) and, per layer, the window (0: none) and whether the other (local) table applies
        tables = sorted(set(self.block.rope_keys), key=lambda k: k != self.block.rope_keys[-1])
        self.step_tables = (tables[0], tables[1] if len(tables) > 1 else None)
        self.step_windows = [w or 0 for w in self.block.windows] if any(self.block.windows) else []
        self.step_local = [int(k != tables[0]) for k in self.block.rope_keys] if len(tables) > 1 else []
        self._rope_tables: dict[tuple[str | None, int | None], tuple[torch.Tensor, torch.Tensor]] = {}  # cos, sin (n, D) by position (_rotary)

    def _norm_weight(self, norm: Any) -> torch.Tensor:
        """An RMSNorm module's scale as the lean forward multiplies by it: `offset + weight` in float32 where the
        family scales by 1 + weight (as Gemma's norm computes it), else the module's own tensor."""
        weight = norm.weight.detach()
        offset = self.block.family.norm_offset
        return weight.float() + offset if offset else weight

    def _whole_step_weights(self) -> tuple[list[torch.Tensor] | None, set[int]]:
        """A w8a8 or w4a8 model whose every block linear runs slmkit's int8 or int4 kernel decodes a step in one call of
        native.decode_step: its weights in the kernel's order (per block: norm, q/k/v, [q norm, k norm], o, [its
        output's norm], norm, gate/up, down, [its output's norm]; each linear as its four step_tensors), and the row
        buckets where every layer's kernel is slmkit's. (None, empty) for any other model or a block the kernel does
        not know (the Python blocks then run)."""
        flags = self.block.step_flags
        if self.kernels is None or flags is None or any(eps != self.eps for *_, eps in self.qk_norms):
            return None, set()
        weights, buckets = [], {0, 1, 2}
        for i in range(len(self.layers)):
            lins = (self.qkv[i], self.layers[i].self_attn.o_proj, self.gate_up[i], self.layers[i].mlp.down_proj)
            attn_norm, attn_out_norm, mlp_norm, mlp_out_norm = self.norms[i]
            heads = list(self.qk_norms[i][:2]) if self.head_norms else []
            norms = [attn_norm, mlp_norm, *heads, *(n for n in (attn_out_norm, mlp_out_norm) if n is not None)]
            if any(type(m) not in (W8A8Linear, W4A8Linear) or m._native is None or m.smooth is not None for m in lins) or any(
                    n.dtype != torch.float32 for n in norms):
                return None, set()
            buckets &= {b for b in range(3) if all(m._kernels[b] == "native" for m in lins)}
            packed = [m.step_tensors() for m in lins]
            weights += [attn_norm, *packed[0], *heads, *packed[1], *([attn_out_norm] if attn_out_norm is not None else []),
                        mlp_norm, *packed[2], *packed[3], *([mlp_out_norm] if mlp_out_norm is not None else [])]
        return weights, buckets

    def _mask(self, positions: torch.Tensor, first_key: int, end: int, window: int | None) -> torch.Tensor:
        """Additive mask (B, 1, G * T, end - first_key) for queries at `positions` (B, T) over keys first_key..end-1:
        causal, each row its own length, and within `window` positions where set; in the layout of the query heads
        sharing a KV head stacked."""
        b, t = positions.shape
        keys = torch.arange(first_key, end)[None, None, :]
        keep = keys <= positions[:, :, None]  # (B, T, keys)
        if window:
            keep &= keys > positions[:, :, None] - window
        keep = keep[:, None].expand(b, self.group, t, end - first_key).reshape(b, 1, self.group * t, end - first_key)
        return torch.zeros(keep.shape, dtype=self.dtype).masked_fill_(~keep, float("-inf"))

    def _spans(self, b: int, t: int, starts: list[int], positions: torch.Tensor, end: int, window: int | None,
               kernel: bool) -> list[tuple[int, int, int, int, torch.Tensor | None]]:
        """Attention's pieces for layers of one window (None: every earlier key), built once per step rather than by
        every layer: (first query, end query, first key, end key, additive mask or None)."""
        def first_key(position: int) -> int:  # the earliest key a query at `position` sees
            return max(0, position - window + 1) if window else 0

        if b == 1 and t > 2 * ATTENTION_PIECE:  # a long prefill: pieces of queries, each seeing the keys up to it
            spans = []
            for c0 in range(0, t, ATTENTION_PIECE):
                c1 = min(c0 + ATTENTION_PIECE, t)
                k0, k1 = first_key(starts[0] + c0), starts[0] + c1
                spans.append((c0, c1, k0, k1, self._mask(positions[:, c0:c1], k0, k1, window)))
            return spans
        if t == 1 and b == 1:  # one new token sees every cached position in its window
            return [(0, 1, first_key(end - 1), end, None)]
        if t == 1 and kernel:  # slmkit's kernel reads each row's own length and window
            return [(0, 1, 0, end, None)]
        k0 = first_key(starts[0]) if b == 1 else 0
        return [(0, t, k0, end, self._mask(positions, k0, end, window))]

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor, key: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, D) at `positions` (B, T), as the model's rotary embedding makes them (Gemma 3: the table of
        layer type `key`): rows of a table it made once for positions 0..n-1 (grown by doubling), for the rope types
        whose angles depend on the position alone. Longrope has two such tables and, as transformers does for a
        sequence, takes the long factors' for a row whose positions reach past the original context."""
        rope = self.inner.rotary_emb
        kind = rope.rope_type[key] if key is not None else getattr(rope, "rope_type", "default")
        make = rope if key is None else (lambda x, p: rope(x, p, key))
        if kind not in STATIC_ROPE_TYPES:  # dynamic ones rescale with the length
            return make(h, positions)
        if kind != "longrope":
            return self._rope_rows(h, make, positions, key)
        params = rope.config.rope_parameters if key is None else rope.config.rope_parameters[key]
        original = int(params["original_max_position_embeddings"])  # the module's table past it has the long factors
        long_rows = positions.amax(dim=1) >= original  # (B,)
        if not bool(long_rows.any()):
            return self._rope_rows(h, make, positions, key, most=original)
        cos, sin = self._rope_rows(h, make, positions, key, least=original + 1)
        if not bool(long_rows.all()):
            short = self._rope_rows(h, make, positions.clamp(max=original - 1), key, most=original)
            cos, sin = (torch.where(long_rows[:, None, None], a, b) for a, b in ((cos, short[0]), (sin, short[1])))
        return cos, sin

    def _rope_rows(self, h: torch.Tensor, make: Any, positions: torch.Tensor, key: str | None, *, least: int = 256,
                   most: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `positions` of the cos/sin table the rotary module `make` gives for positions 0..n-1, n between `least`
        and `most` (kept by layer type and `most`), grown by doubling."""
        end = int(positions.max()) + 1
        table = self._rope_tables.get((key, most))
        if table is None or table[0].shape[0] < end or table[0].dtype != h.dtype:
            n = max(end, least, 2 * (0 if table is None else table[0].shape[0]))
            cos, sin = make(h[:1, :1], torch.arange(n if most is None else min(n, most))[None])  # (1, n, D)
            table = self._rope_tables[(key, most)] = (cos[0], sin[0])
        return table[0][positions], table[1][positions]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, *, add: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
        """The RMSNorm of x's last axis (a new tensor), after x += add (in place) when given; slmkit's kernel where
        built (one call instead of torch's eight)."""
        eps = self.eps if eps is None else eps
        if self.kernels is not None and x.dtype == torch.float32:
            return self.kernels.add_rms_norm(x if add is not None else x.contiguous(), add, weight, eps)
        if add is not None:
            x += add
        return _rms_norm(x, weight, eps)

    def _norm_heads(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """y (..., (H + 2 Hkv) D) with each query and key head RMS-normed (block i's q_norm, k_norm), values as they are."""
        q_weight, k_weight, eps = self.qk_norms[i]
        lead, qk = y.shape[:-1], self.q_width + self.kv_width
        q = self._norm(y[..., : self.q_width].reshape(*lead, self.heads, self.head_dim), q_weight, eps=eps)
        k = self._norm(y[..., self.q_width : qk].reshape(*lead, self.kv_heads, self.head_dim), k_weight, eps=eps)
        return torch.cat([q.reshape(*lead, self.q_width), k.reshape(*lead, self.kv_width), y[..., qk:]], dim=-1)

    def add_adapter(self, factors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Hold one more LoRA adapter (sources/adapters.lora_factors); returns the id a slot runs it by."""
        if self.bank is None:
            self.bank = LoraBank()
        return self.bank.add(factors)

    def new_cache(self, slots: int, capacity: int = 256) -> SlotCache:
        return SlotCache(len(self.layers), slots, self.kv_heads, self.head_dim, self.kv_dtype, capacity)

    @torch.inference_mode()
    def check(self, cache: SlotCache, slot: int, tokens: Sequence[int]) -> torch.Tensor:
        """A speculative check: `tokens` appended to `slot`, the logits after each (n, V). Where slmkit's decode
        kernels run (float32 activations), as n one-token rows of that slot in one step, every layer on the kernel a
        one-token step uses: each row's logits bit-identical to what decoding the tokens one at a time gives (greedy
        text unchanged, on integer models too). Elsewhere one row of n positions (torch's attention: within ~1e-5)."""
        if self.kernels is None:
            return self.forward(cache, torch.tensor([list(tokens)], dtype=torch.long), first=slot, every=True)[0]
        with same_kernels_as(1):
            return self.forward(cache, torch.tensor(list(tokens), dtype=torch.long)[:, None], slots=[slot] * len(tokens))

    @torch.inference_mode()
    def forward(self, cache: SlotCache, ids: torch.Tensor, first: int = 0, every: bool = False,
                slots: Sequence[int] | None = None) -> torch.Tensor:
        """Run `ids` (B, T) for slots first..first+B-1, appending to each slot; return last-position logits (B, V), or
        with `every` the logits after each position (B, T, V) (a speculative check).

        Rows of a multi-row call must each add T tokens; a prefill is a one-row call with the whole prompt. `slots`
        (one-token rows on slmkit's decode kernels only) names each row's slot instead: rows of one slot are that
        sequence's next tokens in order."""
        b, t = ids.shape
        if slots is not None and (t != 1 or self.kernels is None or len(slots) != b):
            raise ValueError("rows by slot are one-token rows, one slot each, on slmkit's decode kernels")
        slot_list = list(slots) if slots is not None else list(range(first, first + b))
        starts, added = [], dict.fromkeys(slot_list, 0)
        for s in slot_list:  # a slot named by several rows: each row one position further
            starts.append(cache.lens[s] + added[s])
            added[s] += t
        end = max(starts) + t
        cache.reserve(end)
        start_t = torch.tensor(starts, dtype=torch.long)
        positions = start_t[:, None] + torch.arange(t)  # (B, T)
        lens = start_t + t  # (B,) each row's length after this step
        decode = self.kernels if t == 1 else None  # slmkit's kernels for a decode step's rotary + attention
        block = self.block
        spans = {w: self._spans(b, t, starts, positions, end, w, decode is not None) for w in set(block.windows)}
        rows = slice(first, first + b)
        row_idx = torch.tensor(slot_list)  # (B,)
        adapters = [cache.adapter[s] for s in slot_list]
        bank = self.bank if self.bank is not None and any(adapters) else None
        groups = LoraBank.row_groups(adapters) if bank is not None else []

        h = self.inner.embed_tokens(ids)  # (B, T, E): the residual stream, added to in place (Gemma's scaled inside)
        rotary = {}  # rope table key -> cos, sin: (B, D) for the decode kernel, else (B, T, 1, D) to broadcast over heads
        for key in set(block.rope_keys):
            cos, sin = self._rotary(h, positions, key)
            rotary[key] = (cos[:, 0].contiguous(), sin[:, 0].contiguous()) if decode is not None else (cos[:, :, None], sin[:, :, None])
        if decode is not None and bank is None and self.step_weights is not None and bucket_of(b) in self.step_buckets:
            # every block of this decode step in one call of slmkit's kernel (no Python between its ~240 operations)
            main, other = self.step_tables
            cos, sin = rotary[main]
            local = rotary[other] if other is not None else (None, None)
            h = decode.decode_step(h.reshape(b, -1), self.step_weights, cos, sin, cache.k, cache.v, lens, row_idx, self.scale,
                                   self.heads, self.eps, block.step_flags, local[0], local[1], self.step_windows,
                                   self.step_local).reshape(b, 1, -1)
        else:
            qk_heads = self.heads + self.kv_heads
            out = None  # the last block's output, not yet added to h (a decode step adds it in the next norm's call)
            for i, layer in enumerate(self.layers):
                attn, mlp = layer.self_attn, layer.mlp
                attn_norm, attn_out_norm, mlp_norm, mlp_out_norm = self.norms[i]
                cos, sin = rotary[block.rope_keys[i]]
                window = block.windows[i]
                x = self._norm(h, attn_norm, add=out)
                y = _linear(self.qkv[i], x) if self.qkv[i] is not None else torch.cat(
                    [_linear(m, x) for m in self.qkv_parts[i]], dim=-1)  # (B, T, (H + 2 Hkv) D)
                if bank is not None:
                    y = bank.apply(("qkv", i), x, y, groups)
                if self.head_norms:
                    y = self._norm_heads(y, i)
                kc, vc = cache.k[i], cache.v[i]
                if decode is not None:  # one call: rotary, each row's new key/value written, its own length attended
                    o = decode.rope_decode_attention(y.reshape(b, -1), cos, sin, kc, vc, lens, row_idx, self.scale, self.heads, window or 0)
                    o = o.reshape(b, 1, self.heads * self.head_dim)
                else:
                    qk = _rotate(y[..., : self.q_width + self.kv_width].reshape(b, t, qk_heads, self.head_dim), cos, sin)
                    q = qk[:, :, : self.heads].transpose(1, 2)  # (B, H, T, D)
                    k = qk[:, :, self.heads :]  # (B, T, Hkv, D)
                    v = y[..., self.q_width + self.kv_width :].reshape(b, t, self.kv_heads, self.head_dim)
                    if b == 1:
                        kc[first, :, starts[0] : starts[0] + t] = k[0].transpose(0, 1)
                        vc[first, :, starts[0] : starts[0] + t] = v[0].transpose(0, 1)
                    else:  # each row writes at its own length
                        pos = positions.T.reshape(-1)  # (T*B,) position-major
                        ridx = row_idx.repeat(t)
                        kc[ridx, :, pos] = k.transpose(0, 1).reshape(t * b, self.kv_heads, self.head_dim).to(kc.dtype)
                        vc[ridx, :, pos] = v.transpose(0, 1).reshape(t * b, self.kv_heads, self.head_dim).to(vc.dtype)
                    parts = []
                    for c0, c1, k0, k1, mask in spans[window]:
                        # (B, Hkv, keys, D), as the cache holds them (a bf16 cache: rounded, as decode steps read them)
                        keys, values = kc[rows, :, k0:k1].to(q.dtype), vc[rows, :, k0:k1].to(q.dtype)
                        # (B, Hkv, G * T', D): the heads sharing a KV head, stacked
                        qg = q[:, :, c0:c1].reshape(b, self.kv_heads, self.group * (c1 - c0), self.head_dim)
                        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=self.scale)
                        parts.append(o.reshape(b, self.heads, c1 - c0, self.head_dim))
                    o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, H, T, D)
                    o = o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
                out = _linear(attn.o_proj, o)
                out = bank.apply(("o", i), o, out, groups) if bank is not None else out
                if attn_out_norm is not None:
                    out = self._norm(out, attn_out_norm)
                x = self._norm(h, mlp_norm, add=out)
                y = _linear(self.gate_up[i], x) if self.gate_up[i] is not None else torch.cat(
                    [_linear(m, x) for m in self.gate_up_parts[i]], dim=-1)  # (B, T, 2 F)
                if bank is not None:
                    y = bank.apply(("gate_up", i), x, y, groups)
                if self.gate_kernel is not None:
                    act = self.gate_kernel(y.reshape(b * t, -1)).reshape(b, t, self.mlp_width)
                else:
                    gate, up = y.split([self.mlp_width, self.mlp_width], dim=-1)
                    act = (mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn)(gate) * up  # Phi-3 names it activation_fn
                out = _linear(mlp.down_proj, act)
                out = bank.apply(("down", i), act, out, groups) if bank is not None else out
                if mlp_out_norm is not None:
                    out = self._norm(out, mlp_out_norm)
            h += out
        for s, n in added.items():
            cache.lens[s] += n
        last = _rms_norm(h if every else h[:, -1], self.final_norm, self.eps)  # (B, E) or (B, T, E)
        logits = _linear(self.model.lm_head, last)  # (B, V) or (B, T, V)
        if block.final_softcap:
            logits = torch.tanh(logits / block.final_softcap) * block.final_softcap
        return logits
