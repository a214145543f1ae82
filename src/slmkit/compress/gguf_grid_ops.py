"""Pure math of llama.cpp's block quantization types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 in torch: the values a float
tensor becomes once llama.cpp quantizes it (ggml-quants.c's quantize_row_*_ref, which llama-quantize runs without an
importance matrix; gguf-py's numpy ports), bit for bit, and its straight-through fake quantizer for
quantization-aware training.

Every type cuts each row into blocks of 32 and keeps one float16 scale per block (and a float16 minimum for the
_1 types). The scale is computed in float32 and rounded to float16 only when stored, while the integers are rounded
with the float32 scale: both steps are reproduced here, so grid(w) equals what llama.cpp dequantizes from the file.
The grid is idempotent (grid(grid(w)) == grid(w)): a model trained onto it and saved as float values is exported
without a second rounding.
"""

from __future__ import annotations

import torch

BLOCK = 32
# type -> (levels - 1, symmetric: scale from the signed extreme, integers centred; else min/max with an offset)
TYPES: dict[str, tuple[int, bool]] = {"Q4_0": (15, True), "Q4_1": (15, False), "Q5_0": (31, True), "Q5_1": (31, False),
                                      "Q8_0": (127, True)}


def check(gguf_type: str, shape: tuple[int, ...]) -> None:
    if gguf_type not in TYPES:
        raise ValueError(f"no grid for {gguf_type}: types {', '.join(TYPES)}")
    if shape[-1] % BLOCK:
        raise ValueError(f"rows of {shape[-1]} are not whole blocks of {BLOCK}")


def _half(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 -> float32: what the file stores of a scale."""
    return x.to(torch.float16).to(torch.float32)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, exactly: halves away from zero (torch.round rounds them to even; floor(a + 0.5) can round a
    value just below a half up); + 0.0 makes a -0 the file's integer 0."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole))) + 0.0


def grid(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """The values llama.cpp's `gguf_type` gives w (..., n), n a multiple of 32: float32, same shape."""
    check(gguf_type, tuple(w.shape))
    top, symmetric = TYPES[gguf_type]
    x = w.detach().to(torch.float32).reshape(-1, BLOCK)  # (blocks, 32)
    if gguf_type == "Q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_away(x * inv)
        out = q * _half(d)
    elif symmetric:  # Q4_0, Q5_0: the scale from the value of largest magnitude, with its sign
        half_levels = (top + 1) // 2  # 8 or 16
        extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        d = extreme / -half_levels
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(x * inv + (half_levels + 0.5)).clamp(0, top)
        out = (q - half_levels) * _half(d)
    else:  # Q4_1, Q5_1: scale and offset from the block's range
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / top
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((x - lo) * inv + 0.5).clamp(0, top)
        out = _half(d) * q + _half(lo)
    return out.reshape(w.shape)


def fake_quantize(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """grid(w) in the forward pass, identity in the backward (the straight-through estimator)."""
    return w + (grid(w, gguf_type).to(w.dtype) - w).detach()
