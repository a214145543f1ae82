"""The lean Llama forward over the slot cache: the same logits and tokens as transformers' own forward."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_family_model, build_tiny_llama

import slmkit
from slmkit import native
from slmkit.compress.quantize_stage import quantize_stage
from slmkit.engine.lean_forward import LeanForward, SlotCache, supports
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.torch_batch import SlotKV
from slmkit.engine.torch_backend import TorchBackend

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
SHAPES = {"gqa-4-2": {}, "mha-2-2": {"heads": 2, "kv_heads": 2}, "pruned-1-layer-mqa": {"layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 48}}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_logits_match_transformers_for_prefill_and_ragged_batched_steps(tmp_path, shape):
    backend = TorchBackend.from_folder(build_tiny_llama(tmp_path / "m", **shape))
    net, fast = backend.model, backend.fast
    assert fast is not None and supports(net)
    seqs = [backend.encode(t) for t in ("The quick brown fox jumps", "Paris is", "héllo wörld 123 and more words")]
    cache = fast.new_cache(3, capacity=4)  # small on purpose: it must grow while holding data
    with torch.inference_mode():
        for slot, ids in enumerate(seqs):
            first = fast.forward(cache, torch.tensor([ids[:2]]), first=slot)  # prefill in two pieces
            last = fast.forward(cache, torch.tensor([ids[2:]]), first=slot)
            torch.testing.assert_close(first[0], net(input_ids=torch.tensor([ids[:2]])).logits[0, -1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(last[0], net(input_ids=torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)
        nxt = [7, 11, 13]
        for _ in range(3):  # rows of different lengths step together
            out = fast.forward(cache, torch.tensor(nxt)[:, None])
            seqs = [s + [t] for s, t in zip(seqs, nxt)]
            for row, ids in enumerate(seqs):
                torch.testing.assert_close(out[row], net(input_ids=torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)
            nxt = [int(out[r].argmax()) for r in range(3)]
    assert cache.lens == [len(s) for s in seqs]


def test_integer_models_keep_their_kv_cache_in_bfloat16_and_float_ones_in_float32(store):
    """The KV dtype follows the activations: a w8a8 child's cache is bf16 where slmkit's attention reads it (half the
    bytes; its rounding is far below the int8 activations'), prefill and steps reading the same rounded keys, and its
    logits stay close to a float32 cache's; the float model's cache stays float32."""
    from slmkit.engine import lean_forward

    quantize_stage("tiny", "w8a8", name="tiny-w8a8")
    fast = slmkit.load("tiny-w8a8").backend.fast
    assert slmkit.load("tiny").backend.fast.new_cache(1).k.dtype == torch.float32
    if fast.kernels is None:
        assert fast.new_cache(1).k.dtype == fast.dtype
        return
    ids, steps = [1, 5, 9, 4, 7, 2, 8], [3, 11, 6]
    out = {}
    for bf16 in (True, False):
        lean_forward.KV_BF16 = bf16
        try:
            f = slmkit.load("tiny-w8a8").backend.fast
        finally:
            lean_forward.KV_BF16 = True
        cache = f.new_cache(1, capacity=4)  # grows, keeping its dtype
        assert cache.k.dtype == (torch.bfloat16 if bf16 else torch.float32)
        with torch.inference_mode():
            rows = [f.forward(cache, torch.tensor([ids]))[0]] + [f.forward(cache, torch.tensor([[t]]))[0] for t in steps]
        assert cache.k.dtype == cache.v.dtype == (torch.bfloat16 if bf16 else torch.float32)
        out[bf16] = torch.stack(rows)
    probs = out[False].softmax(-1)
    assert float((probs - out[True].softmax(-1)).abs().max()) < 0.05


def test_a_long_prefill_attends_in_pieces_and_matches_transformers(tmp_path):
    """A prompt longer than two attention pieces (fresh, and after a cached prefix) gives transformers' logits, and
    the cache it leaves decodes on as transformers does."""
    from slmkit.engine import lean_forward

    backend = TorchBackend.from_folder(build_tiny_llama(tmp_path / "m", context=1024))
    net, fast = backend.model, backend.fast
    ids = torch.randint(0, net.config.vocab_size, (1, 2 * lean_forward.ATTENTION_PIECE + 77))
    with torch.inference_mode():
        want = net(input_ids=ids).logits[0]
        cache = fast.new_cache(2, capacity=8)
        torch.testing.assert_close(fast.forward(cache, ids, first=0)[0], want[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.forward(cache, ids[:, :40], first=1)[0], want[39], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.forward(cache, ids[:, 40:], first=1)[0], want[-1], atol=1e-4, rtol=1e-4)
        nxt = torch.tensor([[5], [5]])
        after = net(input_ids=torch.cat([ids, nxt[:1]], dim=1)).logits[0, -1]
        out = fast.forward(cache, nxt)
        torch.testing.assert_close(out[0], after, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1], after, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_the_transformers_loop(store):
    fast = slmkit.load("tiny").backend
    slow = slmkit.load("tiny").backend
    slow.fast = None  # transformers' forward with its DynamicCache
    for text in ("The quick brown fox", "def add(a, b):\n", "héllo"):
        ids = fast.encode(text)
        assert list(fast.stream_tokens(ids, GREEDY, 20)) == list(slow.stream_tokens(ids, GREEDY, 20))
    params = SamplingParams(temperature=0.9, seed=3)
    ids = fast.encode("Paris")
    assert list(fast.stream_tokens(ids, params, 20)) == list(slow.stream_tokens(ids, params, 20))


@pytest.mark.parametrize("scheme,name", [("int8", "tiny-int8-rtn"), ("int4", "tiny-int4-g32-rtn"), ("w8a8", "tiny-w8a8-rtn"),
                                         ("w4a8", "tiny-w4a8-g32-rtn")])
def test_quantized_models_run_on_the_lean_forward(store, scheme, name):
    quantize_stage("tiny", scheme)
    fast = slmkit.load(name).backend
    slow = slmkit.load(name).backend
    slow.fast = None
    assert fast.fast is not None
    assert (fast.fast.qkv[0] is not None) == (scheme != "int4")  # int8 q/k/v fused into one kernel call
    ids = fast.encode("The quick brown fox")
    with torch.inference_mode():
        got = fast.fast.forward(fast.fast.new_cache(1), torch.tensor([ids]))[0].float()
        want = slow.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    assert float((got - want).norm() / want.norm()) < 0.02  # bfloat16 activations on both paths
    assert int(got.argmax()) == int(want.argmax())


@pytest.mark.skipif(native.ops() is None, reason="slmkit's CPU kernels are not built here")
@pytest.mark.parametrize("family,scheme", [("llama", "w8a8"), ("phi3", "w8a8"), ("qwen3", "w8a8"), ("gemma3_text", "w8a8"),
                                           ("llama", "w4a8"), ("gemma3_text", "w4a8")])
def test_a_w8a8_decode_step_in_one_kernel_call_equals_the_python_blocks(store, tmp_path, family, scheme):
    """native.decode_step runs every block of a w8a8 (or w4a8) decode step in one call (Llama's block; Qwen3's head norms;
    Gemma 3's four norms, GeGLU, two rope tables and sliding windows, rows decoding past the window): the logits and
    the keys and values it writes equal the Python blocks' (ragged rows, a cache that grows); prefill and LoRA rows
    keep the blocks."""
    from slmkit.layers.integer import W4A8Linear, W8A8Linear
    from slmkit.sources.importer import import_path

    name = "tiny"
    if family != "llama":
        name = family.replace("_", "-")
        import_path(build_family_model(tmp_path / name, family, window=5 if family == "gemma3_text" else None), name)
    quantize_stage(name, scheme, name=f"{name}-{scheme}", group_size=32 if scheme == "w4a8" else None)
    fast = slmkit.load(f"{name}-{scheme}").backend.fast
    if scheme == "w4a8" and not fast.kernels.int4_simd():
        pytest.skip("w4a8's kernel needs AVX-512 VNNI or AVX2 (its fallback is a dequantized matmul)")
    for m in {id(m): m for m in [*fast.qkv, *fast.gate_up, *fast.model.modules()] if isinstance(m, W8A8Linear)}.values():
        m.prepare(("native",) * 3)  # the timed choice may be torch's kernels for shapes this small
    assert scheme == "w8a8" or all(type(m) is W4A8Linear for m in fast.qkv)
    fast.step_weights, fast.step_buckets = fast._whole_step_weights()
    per_block = {"llama": 18, "phi3": 18, "qwen3": 20, "gemma3_text": 22}[family]
    assert fast.step_weights is not None and fast.step_buckets == {0, 1, 2} and len(fast.step_weights) == per_block * len(fast.layers)
    calls = []
    real = fast.kernels.decode_step
    caches = [fast.new_cache(3, capacity=4), fast.new_cache(3, capacity=4)]
    prompts = [[1, 5, 9], [2, 4], [7, 8, 9, 10, 11]]
    steps = 6
    with torch.inference_mode():
        for cache in caches:
            for slot, ids in enumerate(prompts):
                fast.forward(cache, torch.tensor([ids]), first=slot)
        nxt = torch.tensor([[3], [6], [12]])
        for _ in range(steps):
            fast.kernels.decode_step = lambda *a: calls.append(1) or real(*a)
            try:
                whole = fast.forward(caches[0], nxt)
            finally:
                fast.kernels.decode_step = real
            saved, fast.step_weights = fast.step_weights, None
            try:
                blocks = fast.forward(caches[1], nxt)
            finally:
                fast.step_weights = saved
            torch.testing.assert_close(whole, blocks, atol=1e-4, rtol=1e-4)
            nxt = blocks.argmax(-1, keepdim=True)
    assert len(calls) == steps and caches[0].lens == caches[1].lens
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].v, caches[1].v, atol=1e-5, rtol=1e-5)


def test_slot_cache_keeps_rows_compact_when_rows_leave():
    cache = SlotCache(layers=1, slots=4, kv_heads=1, head_dim=2, dtype=torch.float32, capacity=2)
    for slot in range(4):
        cache.load(slot, [(torch.full((1, 1, slot + 1, 2), float(slot)), torch.full((1, 1, slot + 1, 2), -float(slot)))])
    cache.reserve(9)
    assert cache.capacity >= 9 and cache.lens == [1, 2, 3, 4]
    kv = SlotKV.__new__(SlotKV)
    kv.cache, kv.rows = cache, 4
    order = kv.keep([0, 2])  # rows 1 and 3 leave: row 2 moves into slot 1
    assert order == [0, 2] and kv.rows == 2
    assert cache.lens[:2] == [1, 3] and torch.all(cache.k[0, 1, 0, :3] == 2.0) and torch.all(cache.v[0, 1, 0, :3] == -2.0)
    assert kv.keep([1]) == [1] and torch.all(cache.k[0, 0, 0, :3] == 2.0)


def test_other_architectures_are_not_claimed():
    class Cfg:
        model_type = "gpt2"

    class Net:
        config = Cfg()

    assert not supports(Net())
    with pytest.raises(ValueError):
        LeanForward(Net())


def test_w8a8_kernels_agree_and_the_choice_is_kept_per_machine(store, home):
    """The W8A8 kernels compute the same int32 products; which one runs for a shape and row count is timed once
    and kept in SLMKIT_HOME/cache for the next load."""
    import json

    from slmkit.layers import integer
    from slmkit.layers.integer import W8A8Linear

    quantize_stage("tiny", "w8a8")
    backend = slmkit.load("tiny-w8a8-rtn").backend
    cache_file = home / "cache" / "w8a8-kernels.json"
    saved = json.loads(cache_file.read_text())[integer.machine_key()]
    layer = backend.fast.qkv[0]
    assert f"{layer.out_features}x{layer.in_features}" in saved
    x = torch.randn(20, layer.in_features)
    outs = []
    kernels = ["int_mm"] + ["onednn"] * integer._has_onednn() + ["native"] * (native.ops() is not None)
    for kernel in kernels:
        forced = W8A8Linear(layer.in_features, layer.out_features, False)
        forced.weight, forced.scales = layer.weight, layer.scales
        forced.prepare((kernel,) * 3)
        with torch.inference_mode():
            outs.append(torch.cat([forced(x[:1]), forced(x[:8]), forced(x)]))
    if "native" in kernels:  # slmkit's kernel: the same int32 sums and the same float scaling, bit for bit
        assert torch.equal(outs[-1], outs[0])
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # and equal to the int8 grid computed in float
        q, s = integer.quantize_rows(x)
        want = (q.float() * s) @ layer.dequantized().T
    torch.testing.assert_close(outs[0][-20:], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_on_the_lean_forward(tmp_path, family):
    backend = TorchBackend.from_folder(build_family_model(tmp_path / family, family))
    net, fast = backend.model, backend.fast
    assert fast is not None and net.config.model_type == family
    if family == "qwen2":
        assert net.model.layers[0].self_attn.q_proj.bias is not None  # the biases are computed, not dropped
    if family in ("qwen3", "gemma3_text"):
        assert fast.head_norms and fast.step_weights is None
    if family == "gemma3_text":
        assert fast.block.rope_keys == ("sliding_attention", "full_attention") and fast.scale == 12 ** -0.5
        assert fast.block.act == "gelu_pytorch_tanh" and fast.block.family.norm_offset == 1.0
    ids = backend.encode("The quick brown fox jumps over")
    cache = fast.new_cache(1, capacity=4)
    with torch.inference_mode():
        torch.testing.assert_close(fast.forward(cache, torch.tensor([ids]), first=0)[0], net(input_ids=torch.tensor([ids])).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)
        out = fast.forward(cache, torch.tensor([[9]]))
        torch.testing.assert_close(out[0], net(input_ids=torch.tensor([ids + [9]])).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_sliding_windows_cut_what_a_token_sees_as_transformers_does(tmp_path, family, kernels):
    """A window of 5 positions: a prefill longer than it (in attention pieces too), then ragged rows decoding past it,
    with slmkit's decode kernels and with torch's operations, give transformers' logits at every step."""
    from slmkit.engine import lean_forward

    backend = TorchBackend.from_folder(build_family_model(tmp_path / family, family, window=5))
    net, fast = backend.model, backend.fast
    assert fast is not None and 5 in fast.block.windows
    if not kernels:
        fast.kernels = fast.gate_kernel = None
    elif fast.kernels is None:
        pytest.skip("slmkit's CPU kernels are not built here")
    torch.manual_seed(0)
    long = torch.randint(0, net.config.vocab_size, (1, 2 * lean_forward.ATTENTION_PIECE + 9)).tolist()[0]
    seqs = [long, backend.encode("The quick brown fox jumps"), backend.encode("Paris is")]
    cache = fast.new_cache(3, capacity=4)
    with torch.inference_mode():
        for slot, ids in enumerate(seqs):
            got = fast.forward(cache, torch.tensor([ids]), first=slot)
            torch.testing.assert_close(got[0], net(input_ids=torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)
        nxt = [7, 11, 13]
        for _ in range(6):  # the short rows grow past the window
            out = fast.forward(cache, torch.tensor(nxt)[:, None])
            seqs = [s + [t] for s, t in zip(seqs, nxt)]
            for row, ids in enumerate(seqs):
                torch.testing.assert_close(out[row], net(input_ids=torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)
            nxt = [int(out[r].argmax()) for r in range(3)]


def test_what_the_lean_forward_cannot_run_is_said_before_anything_is_built():
    from transformers import Gemma2Config, Gemma2ForCausalLM, Phi3Config, Phi3ForCausalLM

    from slmkit.engine.families import unsupported

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    partial = Phi3ForCausalLM(Phi3Config(**small, partial_rotary_factor=0.5))
    assert "part of each head" in unsupported(partial) and not supports(partial)
    assert "gemma2" in unsupported(Gemma2ForCausalLM(Gemma2Config(**small)))
    with pytest.raises(ValueError, match="cannot run this model: rotary"):
        LeanForward(partial)
