"""slmkit's CPU kernels (slmkit/native): built on this machine, they compute what torch's own operations compute."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from slmkit import native
from slmkit.layers.int_packing import quantize_rows

ops = native.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"slmkit's CPU kernels are not built here: {native.unavailable()}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # transformers' rotate-half
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("kv_heads,group", [(3, 3), (2, 1), (1, 4)])
def test_rope_decode_attention_equals_rotary_then_sdpa_over_each_rows_own_length(kv_heads, group):
    """From the fused projection's output: queries and key rotated, the key and value written at each row's last
    position (nothing else in the cache moves), each row attending over its own length."""
    torch.manual_seed(0)
    slots, capacity, d, heads = 6, 40, 16, kv_heads * group
    k, v = torch.randn(slots, kv_heads, capacity, d), torch.randn(slots, kv_heads, capacity, d)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d)
    angle = torch.rand(4, d // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (4, D) as Llama's rotary makes them
    lens = torch.tensor([1, 17, 40, 9])  # a row of one position, a full row, ragged ones
    want_k, want_v = k.clone(), v.clone()
    out = ops.rope_decode_attention(qkv, cos, sin, k, v, lens, torch.arange(2, 6), 0.25, heads)  # rows are slots 2..5
    q = _rotate(qkv[:, : heads * d].reshape(4, heads, d), cos[:, None], sin[:, None])
    k_new = _rotate(qkv[:, heads * d: (heads + kv_heads) * d].reshape(4, kv_heads, d), cos[:, None], sin[:, None])
    v_new = qkv[:, (heads + kv_heads) * d:].reshape(4, kv_heads, d)
    for r in range(4):
        L = int(lens[r])
        want_k[2 + r, :, L - 1], want_v[2 + r, :, L - 1] = k_new[r], v_new[r]
    torch.testing.assert_close(k, want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(v, want_v)
    for r in range(4):
        L = int(lens[r])
        qg = q[r].reshape(1, kv_heads, group, d)
        want = F.scaled_dot_product_attention(qg, want_k[2 + r:3 + r, :, :L], want_v[2 + r:3 + r, :, :L], scale=0.25)
        torch.testing.assert_close(out[r], want.reshape(-1), atol=1e-5, rtol=1e-5)


def test_rope_decode_attention_rows_of_one_slot_see_each_other_as_a_causal_forward():
    """Rows sharing a slot at consecutive lengths (the drafted tokens of a speculative check): every row's key and
    value are written before any row attends, so row i sees rows 0..i-1 (and not later ones), bit for bit what the
    rows give one at a time."""
    torch.manual_seed(1)
    kv_heads, heads, d, n = 2, 4, 16, 5
    k, v = torch.randn(2, kv_heads, 32, d), torch.randn(2, kv_heads, 32, d)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
    angle = torch.rand(n, d // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    lens = torch.arange(11, 11 + n)  # 10 cached positions, then the n rows
    k1, v1 = k.clone(), v.clone()
    together = ops.rope_decode_attention(qkv, cos, sin, k, v, lens, torch.ones(n, dtype=torch.long), 0.25, heads)
    alone = torch.cat([ops.rope_decode_attention(qkv[r:r + 1], cos[r:r + 1], sin[r:r + 1], k1, v1, lens[r:r + 1],
                                                 torch.ones(1, dtype=torch.long), 0.25, heads) for r in range(n)])
    assert torch.equal(together, alone) and torch.equal(k, k1) and torch.equal(v, v1)


def test_rope_decode_attention_on_a_bfloat16_cache_rounds_what_it_writes_and_reads_it_exactly():
    """A bf16 slot cache (integer models' KV): the new key and value are written rounded to nearest even, and the
    attention equals float32 attention over the cache's values as they now are."""
    torch.manual_seed(2)
    kv_heads, heads, d = 2, 6, 16
    k, v = torch.randn(3, kv_heads, 20, d).bfloat16(), torch.randn(3, kv_heads, 20, d).bfloat16()
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d)
    angle = torch.rand(2, d // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    lens, slots = torch.tensor([7, 20]), torch.tensor([2, 0])
    out = ops.rope_decode_attention(qkv, cos, sin, k, v, lens, slots, 0.25, heads)
    q = _rotate(qkv[:, : heads * d].reshape(2, heads, d), cos[:, None], sin[:, None])
    k_new = _rotate(qkv[:, heads * d: (heads + kv_heads) * d].reshape(2, kv_heads, d), cos[:, None], sin[:, None])
    v_new = qkv[:, (heads + kv_heads) * d:].reshape(2, kv_heads, d)
    for r in range(2):
        s, n = int(slots[r]), int(lens[r])
        assert torch.equal(k[s, :, n - 1], k_new[r].bfloat16()) and torch.equal(v[s, :, n - 1], v_new[r].bfloat16())
        keys = k[s, :, :n].float().repeat_interleave(heads // kv_heads, 0)  # (H, n, D)
        values = v[s, :, :n].float().repeat_interleave(heads // kv_heads, 0)
        want = F.scaled_dot_product_attention(q[r][:, None], keys, values, scale=0.25)[:, 0]  # (H, D)
        torch.testing.assert_close(out[r], want.reshape(-1), atol=1e-5, rtol=1e-5)


def test_rope_decode_attention_refuses_rows_or_lengths_outside_the_cache():
    k = v = torch.zeros(2, 1, 8, 4)
    qkv, cos = torch.zeros(2, 3 * 4), torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="capacity"):
        ops.rope_decode_attention(qkv, cos, cos, k, v, torch.tensor([3, 9]), torch.tensor([0, 1]), 1.0, 1)
    with pytest.raises(RuntimeError, match="slots"):
        ops.rope_decode_attention(qkv, cos, cos, k, v, torch.tensor([3, 3]), torch.tensor([1, 2]), 1.0, 1)
    with pytest.raises(RuntimeError, match="heads"):
        ops.rope_decode_attention(qkv, cos, cos, k, v, torch.tensor([3, 3]), torch.tensor([0, 1]), 1.0, 2)


def test_add_rms_norm_and_silu_gate_compute_what_torch_does():
    torch.manual_seed(4)
    h, delta, w = torch.randn(5, 1, 48), torch.randn(5, 1, 48), torch.rand(48) + 0.5
    want_h = h + delta
    want = F.rms_norm(want_h, (48,), w, 1e-5)
    got = ops.add_rms_norm(h, delta, w, 1e-5)
    torch.testing.assert_close(h, want_h, atol=0, rtol=0)  # the residual added in place
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.add_rms_norm(h, None, w, 1e-5), want, atol=1e-5, rtol=1e-5)
    y = torch.randn(3, 2 * 40) * 4
    torch.testing.assert_close(ops.silu_mul(y), F.silu(y[:, :40]) * y[:, 40:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [0, 128])
def test_quantizer_is_bit_identical_to_quant_ops(offset):
    torch.manual_seed(1)
    x = torch.randn(37, 96) * torch.logspace(-3, 2, 37)[:, None]
    x[3] = 0  # an all-zero row: the scale's floor
    x[5, :4] = torch.tensor([127.5, -127.5, 0.5, -0.5]) * (x[5].abs().max() / 127.5)  # ties round to even
    q, s = ops.quantize_rows(x, offset)
    want_q, want_s = quantize_rows(x, offset=offset)
    assert q.dtype == want_q.dtype and torch.equal(q, want_q) and torch.equal(s, want_s)


def test_dequantizer_is_bit_identical_to_torchs_three_ops():
    torch.manual_seed(3)
    y = torch.randint(-2**20, 2**20, (5, 33), dtype=torch.int32)
    s, scales = torch.rand(5, 1) / 100, torch.rand(33) / 7
    assert torch.equal(ops.dequantize_rows(y, s, scales), y.float().mul_(s).mul_(scales))
    bias = torch.randn(33)
    assert torch.equal(ops.dequantize_rows(y, s, scales, bias), y.float().mul_(s).mul_(scales) + bias)


def test_the_lean_forward_and_w8a8_layers_use_them(tmp_path):
    from conftest import build_tiny_llama

    from slmkit.engine.torch_backend import TorchBackend
    from slmkit.layers import integer

    fast = TorchBackend.from_folder(build_tiny_llama(tmp_path / "m")).fast
    assert fast.kernels is ops
    calls = []
    real_quantize, real_linear = ops.quantize_rows, ops.int8_linear
    layer = integer.W8A8Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    try:
        ops.quantize_rows = lambda x, o: calls.append(("quantize_rows", tuple(x.shape))) or real_quantize(x, o)
        ops.int8_linear = lambda x, *rest: calls.append(("int8_linear", tuple(x.shape))) or real_linear(x, *rest)
        layer.prepare(("int_mm",) * 3)
        layer(x)
        layer.prepare(("native",) * 3)
        layer(x)
    finally:
        ops.quantize_rows, ops.int8_linear = real_quantize, real_linear
    assert calls == [("quantize_rows", (3, 8)), ("int8_linear", (3, 8))]


@pytest.mark.parametrize("n, k", [(64, 32), (50, 37), (130, 8), (200, 96), (70, 576)])
def test_int8_linear_is_bit_identical_to_quantize_int_mm_and_scale(n, k):
    """Odd sizes (N not a multiple of the 64-column tile, K not of 4), rows in and around the 6-row passes,
    smoothing and bias: the same floats as the three-op path it replaces."""
    torch.manual_seed(n + k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    packed, comp = ops.pack_int8(w)
    scales, bias, smooth = torch.rand(n) + 0.1, torch.randn(n), torch.rand(k) + 0.5
    for m in (1, 2, 5, 6, 7, 16, 33):
        x = torch.randn(m, k) * 3
        x[0, :3] = 0 if m > 1 else x[0, :3]  # a row with zeros among others
        for b in (None, bias):
            for sm in (None, smooth):
                q, s = quantize_rows(x if sm is None else x / sm)
                want = (q.int() @ w.int().T).float().mul_(s).mul_(scales)
                want = want if b is None else want + b
                assert torch.equal(ops.int8_linear(x, packed, comp, n, scales, b, sm), want), (m, b is None, sm is None)
    zero = torch.zeros(2, k)  # an all-zero row: scale 1e-10, products 0
    assert torch.equal(ops.int8_linear(zero, packed, comp, n, scales), torch.zeros(2, n))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="builds with an x86 flag")
@pytest.mark.parametrize("flag, simd", [("-mno-avx512vnni", True), ("-mno-avx2", False)])
def test_the_kernels_without_vnni_or_avx2_build_and_compute_the_same(tmp_path, flag, simd):
    """The other paths (CPUs without AVX-512 VNNI: the int8 linear's plain C++ loop and the int4 linear's AVX2 path; without
    AVX2 either: both plain loops) built here with those instructions turned off, in a process of their own (their ops
    would clash with the loaded library's): they compile, the int8 linear gives the torch path's floats bit for bit and
    the int4 linear the float64 reference's to float32 rounding, odd N and rows around the AVX2 path's pairs included."""
    source, flags = native.SOURCES["slmkit_quantize"]
    script = f"""
import torch
from torch.utils import cpp_extension
from slmkit.layers.int_packing import quantize_rows
cpp_extension.load(name="slmkit_quantize_{flag.strip('-').replace('-', '_')}", sources=[{str(native.HERE / source)!r}],
                   build_directory={str(tmp_path)!r}, extra_cflags={[*native.BASE_FLAGS, *flags, flag]!r}, is_python_module=False)
ops = torch.ops.slmkit_quantize
assert not ops.int8_vnni() and ops.int4_simd() == {simd}
torch.manual_seed(0)
for n, k in [(50, 37), (130, 8)]:
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    packed, comp = ops.pack_int8(w)
    scales, bias, smooth = torch.rand(n) + 0.1, torch.randn(n), torch.rand(k) + 0.5
    for m in (1, 5, 17):
        x = torch.randn(m, k) * 3
        q, s = quantize_rows(x / smooth)
        want = (q.int() @ w.int().T).float().mul_(s).mul_(scales) + bias
        assert torch.equal(ops.int8_linear(x, packed, comp, n, scales, bias, smooth), want), (n, k, m)
for n, k, group in [(50, 64, 32), (130, 128, 64), (40, 96, 32)]:  # W4A8's kernel too
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales, mins = (torch.rand(n, k // group) * 0.05).bfloat16(), (-torch.rand(n, k // group) * 0.4).bfloat16()
    packed, dm = ops.pack_int4(q, scales, mins)
    bias, smooth = torch.randn(n), torch.rand(k) + 0.5
    for m in (1, 2, 3, 5, 17):
        x = torch.randn(m, k) * 3
        for b in (None, bias):
            a, s = quantize_rows((x / smooth).reshape(-1, group))
            w = (q.double().reshape(n, -1, group) * scales.double()[..., None] + mins.double()[..., None]).reshape(n, k)
            want = (a.double() * s.double()).reshape(m, k) @ w.T + (0 if b is None else b.double())
            got = ops.int4_linear(x, packed, dm, n, b, smooth).double()
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (n, k, m)
print("same")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-3000:]


def _int4_reference(x, q, scales, mins, bias=None, smooth=None):
    """What int4_linear computes, in float64: the int8 activations (per row and group) times the dequantized weight."""
    n, k = q.shape
    g = scales.shape[1]
    a, s = quantize_rows((x if smooth is None else x / smooth).reshape(-1, k // g))  # (M * G, group), (M * G, 1)
    w = (q.double().reshape(n, g, k // g) * scales.double()[..., None] + mins.double()[..., None]).reshape(n, k)
    y = (a.double() * s.double()).reshape(x.shape[0], k) @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("n, k, group", [(64, 32, 32), (50, 64, 32), (130, 128, 64), (200, 256, 128), (577, 96, 32)])
def test_int4_linear_computes_the_int8_rows_times_the_dequantized_weight(n, k, group):
    """W4A8's kernel: N not a multiple of the 64-column tile, rows in and around the 4-row passes, each weight group's
    own scale and minimum and each activation group's own scale, smoothing and bias: the integer sums are exact, so only float32 rounding of the per-group sums
    separates it from the float64 reference."""
    torch.manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.05 + 1e-3).to(torch.bfloat16)
    mins = (-torch.rand(n, k // group) * 0.4).to(torch.bfloat16)
    packed, dm = ops.pack_int4(q, scales, mins)
    bias, smooth = torch.randn(n), torch.rand(k) + 0.5
    for m in (1, 2, 3, 4, 5, 16, 33):
        x = torch.randn(m, k) * 3
        for b in (None, bias):
            for sm in (None, smooth):
                got = ops.int4_linear(x, packed, dm, n, b, sm).double()
                want = _int4_reference(x, q, scales, mins, b, sm)
                assert got.shape == (m, n)
                assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (m, b is None, sm is None)
    with pytest.raises(RuntimeError, match="does not match the packed weight"):
        ops.int4_linear(torch.randn(2, k + 4), packed, dm, n)
    with pytest.raises(RuntimeError, match="group size must divide K"):
        ops.pack_int4(q[:, :30], scales[:, :1], mins[:, :1])


def test_a_w4a8_layer_computes_the_same_with_and_without_the_kernel():
    """W4A8Linear on slmkit's kernel and on its fallback (no compiler, no VNNI: int8 groups times the dequantized weight)
    give the same outputs; a fused q/k/v layer equals its parts side by side."""
    from slmkit.compress.quantize import quantize_layer
    from slmkit.layers.integer import W4A8Linear

    torch.manual_seed(0)
    lins = [torch.nn.Linear(128, n, bias=True) for n in (96, 32, 32)]
    layers = [quantize_layer(lin, "w4a8", 32, "rtn", None, "float") for lin in lins]
    assert all(isinstance(m, W4A8Linear) for m in layers)
    x = torch.randn(5, 128)
    with torch.no_grad():
        kernel = [m(x) for m in layers]
        assert layers[0]._native is not None or not ops.int4_simd()
        for m in layers:
            m._native = None  # the fallback
        fallback = [m(x) for m in layers]
        for a, b in zip(kernel, fallback):
            assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())
        fused = W4A8Linear.concat(layers)
        assert torch.allclose(fused(x), torch.cat(fallback, dim=1), atol=1e-5 * float(fallback[0].abs().max()))
        ref = torch.cat([lin(x) for lin in lins], dim=1)
        assert float((fused(x) - ref).norm() / ref.norm()) < 0.1  # 4-bit weights and int8 rows: near the float layer


@pytest.mark.skipif(ops is None or not ops.int8_amx(), reason="AMX-INT8 tiles: not on this CPU, or not granted by the OS")
def test_int8_linear_on_amx_tiles_equals_the_vnni_kernel(tmp_path):
    """Where the CPU has AMX and the OS grants the tile state, 4+ rows with K a multiple of 64 run on the tiles: the
    same floats, bit for bit, as the VNNI kernel gives with SLMKIT_AMX=0 (in a process of its own), rows past a
    16-row tile included."""
    import os

    torch.manual_seed(3)
    n, k = 200, 576
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    x, scales, bias = torch.randn(40, k) * 3, torch.rand(n) + 0.1, torch.randn(n)
    torch.save((w, x, scales, bias), tmp_path / "in.pt")
    script = f"""
import torch
from slmkit import native
ops = native.ops()
assert not ops.int8_amx()
w, x, scales, bias = torch.load({str(tmp_path / "in.pt")!r})
packed, comp = ops.pack_int8(w)
torch.save([ops.int8_linear(x[:m], packed, comp, {n}, scales, bias) for m in (8, 16, 17, 40)], {str(tmp_path / "out.pt")!r})
"""
    env = {**os.environ, "SLMKIT_AMX": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    packed, comp = ops.pack_int8(w)
    for m, want in zip((8, 16, 17, 40), torch.load(tmp_path / "out.pt")):
        assert torch.equal(ops.int8_linear(x[:m], packed, comp, n, scales, bias), want), m


def test_int8_linear_refuses_a_weight_it_was_not_packed_for():
    packed, comp = ops.pack_int8(torch.ones(64, 32, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="does not match the packed weight"):
        ops.int8_linear(torch.randn(2, 40), packed, comp, 64, torch.ones(64))


def test_without_them_torch_computes_the_same(monkeypatch):
    monkeypatch.setenv("SLMKIT_NATIVE", "0")
    native.ops.cache_clear()
    try:
        assert native.ops() is None and native.unavailable() == "SLMKIT_NATIVE=0"
    finally:
        monkeypatch.delenv("SLMKIT_NATIVE")
        native.ops.cache_clear()
        assert native.ops() is not None
