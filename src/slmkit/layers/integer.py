"""Linear layers holding real integer weights, computed with torch's CPU weight-only kernels.

Decoding (a few rows at a time) calls the integer kernels with bfloat16 activations (they are several times
slower with float32 ones on CPU); prefill and scoring (many rows) dequantize the weight on the fly and use a
float32 matmul, which is faster there (bf16 matmuls are slow on CPUs without AMX). Outputs come back in the
input's dtype; a loaded quantized model keeps its activations in bf16. Int4 keeps the portable nibble-packed weight as its saved state and builds the kernel's own packed layout at
load time, so files do not depend on a torch build's internal layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slmkit.compress.quant_ops import unpack_nibbles

COMPUTE = torch.bfloat16
KERNEL_MAX_ROWS = 16  # up to this many rows the integer kernel wins; above, dequantize + float32 matmul
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default  # resolved once: per-call lookup costs µs on a 200-call step
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


class _Recomputed(torch.autograd.Function):
    """y = x W^T with W dequantized again in backward rather than kept from forward: training through integer
    layers (QLoRA: gradients flow to adapters before them) never holds a float copy of the frozen weights."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x (M, K) float32 -> (M, N)
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantized())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # grad (M, N) -> (M, K)
        return grad @ ctx.layer.dequantized(), None


def _weight_only_forward(layer: "Int8Linear | Int4Linear", x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Shared by the integer layers: `kernel` (bf16 (M, K) -> (M, N)) for up to KERNEL_MAX_ROWS rows, else the
    dequantized weight in a float32 matmul; then the bias, in the input's dtype and shape."""
    shape = x.shape
    x2 = x.reshape(-1, layer.in_features)  # (M, K)
    if layer.smooth is not None:
        x2 = x2 / layer.smooth.to(x2.dtype)
    if x2.requires_grad and torch.is_grad_enabled():  # training through the frozen integer weights
        y = _Recomputed.apply(x2.float(), layer).to(x.dtype)
    elif x2.shape[0] <= KERNEL_MAX_ROWS:
        y = kernel((x2 if x2.dtype == COMPUTE else x2.to(COMPUTE)).contiguous())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
    else:
        y = torch.nn.functional.linear(x2.float(), layer.dequantized()).to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*shape[:-1], layer.out_features)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b, q int8 per output channel. Optional per-input-channel `smooth` (AWQ)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=COMPUTE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE) if bias else None)
        self.register_buffer("smooth", None)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (N, K)

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing several (same input, outputs side by side); the parts become views of it."""
        bias = parts[0].bias is not None
        fused = cls(parts[0].in_features, sum(p.out_features for p in parts), bias)
        fused.weight = torch.cat([p.weight for p in parts])
        fused.scales = torch.cat([p.scales for p in parts])
        fused.bias = torch.cat([p.bias for p in parts]) if bias else None
        start = 0
        for p in parts:  # share storage: no second copy of the weights
            end = start + p.out_features
            p.weight, p.scales = fused.weight[start:end], fused.scales[start:end]
            p.bias = fused.bias[start:end] if bias else None
            start = end
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _weight_only_forward(self, x, lambda x2: _INT8_MM(x2, self.weight, self.scales))


class Int4Linear(nn.Module):
    """y = x @ (q * scale + minimum)^T + b, q 4-bit per group of input columns (tinygemm CPU kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones((out_features, groups), dtype=COMPUTE))
        self.register_buffer("mins", torch.zeros((out_features, groups), dtype=COMPUTE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE) if bias else None)
        self.register_buffer("smooth", None)
        self._packed: torch.Tensor | None = None
        self._scales_zeros: torch.Tensor | None = None

    def prepare(self) -> None:
        """Build the kernel layout from the saved state (after loading or quantizing)."""
        q = unpack_nibbles(self.qweight).to(torch.int32)  # (N, K) in [0, 15]
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        zeros = self.mins.float() + 8 * self.scales.float()
        self._scales_zeros = torch.stack([self.scales.float().T, zeros.T], dim=-1).contiguous().to(COMPUTE)  # (K/g, N, 2)

    def dequantized(self) -> torch.Tensor:
        q = unpack_nibbles(self.qweight).float()  # (N, K)
        n, k = q.shape
        g = q.reshape(n, k // self.group_size, self.group_size)
        return (g * self.scales.float()[..., None] + self.mins.float()[..., None]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.prepare()
        return _weight_only_forward(self, x, lambda x2: _INT4_MM(x2, self._packed, self.group_size, self._scales_zeros))


def dense_linear(layer: "Int8Linear | Int4Linear") -> nn.Linear:
    """A float32 nn.Linear computing what the integer layer computes (the smoothing folded into the weight)."""
    w = layer.dequantized()  # (N, K)
    if layer.smooth is not None:
        w = w / layer.smooth.float()[None, :]
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    return lin
