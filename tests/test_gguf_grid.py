"""llama.cpp's block types as slmkit's QAT grid (compress/gguf_grid_ops.py): bit for bit what gguf-py's ports of
ggml's reference quantizers give, idempotent, and a straight-through gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from slmkit.compress import gguf_grid_ops as gg


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = 0.01  # a constant block
    w[2, 5] = -0.9  # an outlier, negative: the symmetric types' scale takes its sign
    w[3, 40:72] = torch.linspace(-1, 1, 32)  # values on exact halves of the grid
    w[4, :32] = torch.tensor([127.0] + [0.49999997, 0.5, 1.5, 2.5, -0.5, -2.5] * 5 + [1.0])  # Q8_0 halves, 1 - 2^-25
    return w


@pytest.mark.parametrize("gguf_type", list(gg.TYPES))
def test_the_grid_is_ggml_bit_for_bit_and_idempotent(gguf_type):
    qtype = GGMLQuantizationType[gguf_type]
    for seed in range(3):
        w = _weights(seed)
        ref = dequantize(quantize(w.numpy(), qtype), qtype)
        ours = gg.grid(w, gguf_type)
        assert np.array_equal(ours.numpy().view(np.uint32), ref.astype(np.float32).view(np.uint32))
        assert torch.equal(gg.grid(ours, gguf_type), ours)  # a second rounding changes nothing


def test_fake_quantize_passes_the_gradient_straight_through():
    w = _weights(0).requires_grad_()
    y = gg.fake_quantize(w, "Q4_0")
    assert torch.equal(y.detach(), gg.grid(w, "Q4_0"))
    (y * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="whole blocks"):
        gg.grid(torch.zeros(4, 48), "Q4_0")
    with pytest.raises(ValueError, match="no grid"):
        gg.grid(torch.zeros(4, 64), "Q3_K")
