"""A linear layer stored as two thin ones: y = up(down(x)), W (N, K) ~ up (N, r) @ down (r, K).

It holds r (N + K) weights instead of N K, and costs that many multiply-adds per row. Made by `slmkit lowrank`
(compress/lowrank.py); saved as `NAME.down.weight` and `NAME.up.weight` beside the ranks in config.json."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)  # (r, K)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)  # (N, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """The (N, K) matrix the two factors multiply back to."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
