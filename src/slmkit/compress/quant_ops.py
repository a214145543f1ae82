"""Pure tensor math for quantization (weights, and w8a8's activation rows): no modules, no models, no I/O.

Conventions: a weight is (N, K) = (out_features, in_features). int8 is symmetric per output channel;
int4 is asymmetric per group of `group` input columns, w ~= q * scale + minimum with q in [0, 15]; the quantizer
keeps the minimum a whole number of steps below zero (an integer zero point), the other functions take any minimum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INT4_MAX = 15


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row scale so that the largest |w| maps to 127.  # (N,)"""
    return (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)


def quantize_int8(w: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest: (q int8 (N, K), scales (N,))."""
    s = int8_scales(w) if scales is None else scales
    q = torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8)
    return q, s


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def int4_params(w: torch.Tensor, group: int, *, integer_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, minimum) of an (N, K) weight, asymmetric.  # (N, K/group) each

    integer_zero: the range [min(w, 0), max(w, 0)] in 15 steps with the minimum a whole number of steps below zero
    (minimum = -zero_point * scale, zero_point in [0, 15]): the form GPTQ, AWQ and compressed-tensors' W4A16_ASYM
    store. Otherwise the group's own [min, max] with a free minimum (llama.cpp's Q4_1 grid)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    if not integer_zero:
        return ((hi - lo) / INT4_MAX).clamp(min=1e-10), lo
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / INT4_MAX).clamp(min=1e-10)
    zero_point = torch.round(-lo / scale).clamp(0, INT4_MAX)
    return scale, -zero_point * scale


def int4_error(w: torch.Tensor, group: int, *, integer_zero: bool) -> float:
    """Squared error of round-to-nearest on one of the two int4 grids."""
    q, scale, lo = quantize_int4(w, group, int4_params(w, group, integer_zero=integer_zero))
    return float((dequantize_int4(q, scale, lo) - w).pow(2).sum())


def quantize_int4(
    w: torch.Tensor, group: int, params: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: (q uint8 in [0, 15] (N, K), scales (N, K/g), minimums (N, K/g))."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"group size {group} does not divide {k} input features")
    scale, lo = int4_params(w, group) if params is None else params
    q = torch.round((w.reshape(n, k // group, group) - lo[..., None]) / scale[..., None]).clamp(0, INT4_MAX)
    return q.reshape(n, k).to(torch.uint8), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    return (q.reshape(n, groups, k // groups).float() * scale[..., None].float() + lo[..., None].float()).reshape(n, k)


ColumnUpdate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def obs_sweep(w: torch.Tensor, hessian: torch.Tensor, update: ColumnUpdate, *, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The Optimal Brain Surgeon column sweep GPTQ and SparseGPT share: columns left to right, each replaced by
    `update(w1, rest, hinv1, i, col)` (rounded, or pruned), its error pushed onto the columns not yet done,
    weighted by the inverse Hessian of the layer's inputs (H = 2 X^T X), in blocks of `block` columns.

    `update` sees the current block w1 (N, b) and the columns after it `rest` (N, K - i2), both already carrying
    earlier errors, the block's inverse-Hessian factor hinv1 (b, b), and the column's index in the block `i` and
    in the layer `col`; it returns the new column (N,). Returns the result (N, K)."""
    w = w.clone().float()
    h = hessian.clone().float()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (K, K)
    out = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            q = update(w1, w[:, i2:], hinv1, i, col)
            out[:, col] = q
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, quant_dequant: Callable[[torch.Tensor, int], torch.Tensor], *,
    block: int = 128, damp: float = 0.01, group: int | None = None,
    refresh: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022): quantize columns left to right with obs_sweep.

    `quant_dequant(column (N,), col_index)` rounds one column with the current grid and returns it
    dequantized; `refresh(w_slice)` is called at each group start with the (error-updated) group's columns
    so the grid can follow them. Returns the dequantized result (N, K); the caller rounds it to the grid.
    """

    def update(w1: torch.Tensor, rest: torch.Tensor, _hinv1: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if group and refresh is not None and col % group == 0:
            refresh(torch.cat([w1[:, i:], rest], dim=1)[:, :group])
        return quant_dequant(w1[:, i], col)

    return obs_sweep(w, hessian, update, block=block, damp=damp)
