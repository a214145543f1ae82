"""How the integer layers keep and compute their numbers: 4-bit weights two to a byte, and w8a8's per-row int8
activations (pure tensor math, used at inference by layers/integer.py and when quantizing by compress/)."""

from __future__ import annotations

import torch


def quantize_rows(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric int8 activations: (q (M, K), scale float32 (M, 1)); the grid is
    compressed-tensors' dynamic per-token one (scale = max|x| / 127.5, q in [-128, 127]), so other readers of a
    w8a8 child compute what slmkit computes. offset 128 gives q + 128 as uint8 (oneDNN's activation type)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.5).clamp_(min=1e-10)
    q = torch.round(xf / scale).clamp_(-128, 127)
    if offset:
        return q.add_(offset).to(torch.uint8), scale
    return q.to(torch.int8), scale


def quantize_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """W4A8's activations: quantize_rows' grid over each group of `group` inputs of each row (llama.cpp's Q8_0 blocks),
    returned dequantized (float32, x's shape): what the int4 kernel multiplies, up to float rounding."""
    shape = x.shape
    q, scale = quantize_rows(x.reshape(-1, group))  # (M * G, group), (M * G, 1)
    return (q.float() * scale).reshape(shape)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte (even column in the low nibble): the portable on-disk form.  # (N, K/2)"""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty((n, half * 2), dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out
