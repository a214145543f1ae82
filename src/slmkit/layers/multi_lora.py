"""Several LoRA adapters over one loaded base, applied per row of a batch (what multi-LoRA servers such as
S-LoRA/Punica do on GPUs): a row of adapter a gets y = base(x) + (x A_a^T) B_a^T, with adapter 0 meaning none.
The base's weights exist once; each adapter costs only its own A and B. The engine groups the rows of a step by
adapter (a step usually holds few adapters), so each adapter's factors are used as they are, never copied per row.

Fused engine layers (q/k/v, gate/up) get one fused factor pair per adapter: A stacked over the parts (sum r, K),
B block-diagonal (sum N, sum r), the scaling alpha / r folded into B."""

from __future__ import annotations

import torch

# the engine's groups of a decoder block: the parts it computes together, in the order of their outputs
GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def fused_pair(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None], widths: list[int], in_features: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One (A, B) for parts computed side by side: each part (A (r, K), B (N, r), scaling) or None (not adapted,
    width N of zeros). A: (sum r, K); B: (sum N, sum r) block-diagonal, scaled."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    rank = sum(a.shape[0] for a, _, _ in present)
    a_out = torch.zeros((rank, in_features), dtype=dtype)
    b_out = torch.zeros((sum(widths), rank), dtype=dtype)
    r0 = n0 = 0
    for part, width in zip(parts, widths):
        if part is not None:
            a, b, scale = part
            r = a.shape[0]
            a_out[r0: r0 + r] = a.to(dtype)
            b_out[n0: n0 + width, r0: r0 + r] = b.to(dtype) * scale
            r0 += r
        n0 += width
    return a_out, b_out


class LoraBank:
    """The factors of adapters 1..n for every engine group of every block: `pairs[(group, layer)][adapter]`."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.count = 0  # adapters held (ids 1..count)

    def add(self, factors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Hold one adapter's fused factors; returns its id."""
        self.count += 1
        for key, pair in factors.items():
            self.pairs.setdefault(key, {})[self.count] = pair
        return self.count

    @staticmethod
    def row_groups(adapters: list[int]) -> list[tuple[int, list[int] | None]]:
        """Once per forward: (adapter, its rows, or None for all rows) for each adapter present but 0."""
        present = set(adapters) - {0}
        if len(present) == 1 and 0 not in adapters:
            return [(present.pop(), None)]
        return [(a, [i for i, r in enumerate(adapters) if r == a]) for a in sorted(present)]

    def apply(self, key: tuple[str, int], x: torch.Tensor, y: torch.Tensor,
              groups: list[tuple[int, list[int] | None]]) -> torch.Tensor:
        """y (B, T, N) += each row's adapter update of x (B, T, K) (`groups` from row_groups); rows of adapter 0,
        or of one without this layer, stay as they are."""
        held = self.pairs.get(key)
        if not held:
            return y
        for a, rows in groups:
            pair = held.get(a)
            if pair is None:
                continue
            xa = x if rows is None else x[rows]
            delta = ((xa.to(pair[0].dtype) @ pair[0].T) @ pair[1].T).to(y.dtype)  # (b, T, r) -> (b, T, N)
            if rows is None:
                y = y + delta
            else:
                y[rows] += delta
        return y
