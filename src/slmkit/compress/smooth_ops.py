"""SmoothQuant's math (Xiao et al. 2022), pure tensors: move activation outliers into the weights before int8.

Int8 per-token activations lose the small channels of a row when a few channels are large (outliers). Dividing
input channel j by s_j and multiplying the weights' column j by s_j computes the same product, with
s_j = max|x_j|^alpha / max|w_j|^(1 - alpha): the ranges of activations and weights are balanced. alpha is searched
per group of layers that read the same input, on sample rows, for the least W8A8 output error.
"""

from __future__ import annotations

import torch

from slmkit.compress import quant_ops as qo
from slmkit.layers.int_packing import quantize_rows

ALPHAS = tuple(i / 20 for i in range(2, 20))  # 0.1, 0.15, .., 0.95


def scales_for(absmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (K,) for inputs with per-channel max |x| `absmax` (K,) read by weights whose columns' max |w| is `wmax` (K,)."""
    s = absmax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def group_heads(v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Per-channel maxima over the attention output (H*D,) -> (Hkv*D,): the max over the query heads that share a KV
    head (query head h reads KV head h // (H / Hkv), as transformers' repeat_kv lays them out)."""
    d = v.shape[-1] // heads
    return v.reshape(kv_heads, heads // kv_heads, d).amax(1).reshape(kv_heads * d)


def spread_heads(s: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """(Hkv*D,) per value channel -> (H*D,) per attention output channel: each query head takes its KV head's."""
    d = s.shape[-1] // kv_heads
    return s.reshape(kv_heads, 1, d).expand(kv_heads, heads // kv_heads, d).reshape(heads * d)


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> float:
    """||x w^T - Q(x / s) Q(w s)^T||^2 on the grids a w8a8 child uses: activations per token, weights per output
    channel."""
    ref = x @ w.T
    xs, ws = (x, w) if s is None else (x / s, w * s)
    q, scale = quantize_rows(xs)
    return float(((q.float() * scale) @ qo.dequantize_int8(*qo.quantize_int8(ws)).T - ref).pow(2).sum())


def search_scales(x: torch.Tensor, w: torch.Tensor, absmax: torch.Tensor,
                  kv_groups: tuple[int, int] | None = None) -> tuple[torch.Tensor | None, float | None]:
    """(s, alpha) of least W8A8 error on sample rows x (M, K); (None, None) when no smoothing beats none.
    kv_groups = (H, Hkv): x is attention output, smoothed through the values (one scale per value channel, shared by
    the query heads that read it)."""
    wmax = w.abs().amax(0)
    if kv_groups is not None:
        absmax, wmax = group_heads(absmax, *kv_groups), group_heads(wmax, *kv_groups)
    best, best_alpha, best_err = None, None, w8a8_error(x, w, None)
    for alpha in ALPHAS:
        s = scales_for(absmax, wmax, alpha)
        if kv_groups is not None:
            s = spread_heads(s, *kv_groups)
        err = w8a8_error(x, w, s)
        if err < best_err:
            best, best_alpha, best_err = s, alpha, err
    return best, best_alpha
