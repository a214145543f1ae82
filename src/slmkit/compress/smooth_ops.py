"""SmoothQuant's math (Xiao et al. 2022), pure tensors: move activation outliers into the weights before int8.

Int8 per-token activations lose the small channels of a row when a few channels are large (outliers). Dividing
input channel j by s_j and multiplying the weights' column j by s_j computes the same product, with
s_j = max|x_j|^alpha / max|w_j|^(1 - alpha): the ranges of activations and weights are balanced. alpha is searched
per group of layers that read the same input, on sample rows, for the least W8A8 output error.
"""

from __future__ import annotations

import torch

from slmkit.compress import quant_ops as qo

ALPHAS = tuple(i / 20 for i in range(2, 20))  # 0.1, 0.15, .., 0.95


def scales_for(absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (K,) for inputs with per-channel max |x| `absmax` (K,) read by weights w (N, K) (the group's rows stacked)."""
    wmax = w.abs().amax(0).clamp(min=1e-5)
    s = absmax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp(min=1e-5)


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> float:
    """||x w^T - Q(x / s) Q(w s)^T||^2 on the grids a w8a8 child uses: activations per token, weights per output
    channel."""
    ref = x @ w.T
    xs, ws = (x, w) if s is None else (x / s, w * s)
    q, scale = qo.quantize_rows(xs)
    return float(((q.float() * scale) @ qo.dequantize_int8(*qo.quantize_int8(ws)).T - ref).pow(2).sum())


def search_scales(x: torch.Tensor, w: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
    """(s, alpha) of least W8A8 error on sample rows x (M, K); (None, None) when no smoothing beats none."""
    best, best_alpha, best_err = None, None, w8a8_error(x, w, None)
    for alpha in ALPHAS:
        s = scales_for(absmax, w, alpha)
        err = w8a8_error(x, w, s)
        if err < best_err:
            best, best_alpha, best_err = s, alpha, err
    return best, best_alpha
