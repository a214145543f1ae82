"""Scaled rotary embeddings (linear, llama3, YaRN, longrope, dynamic NTK) on every path: the lean forward's tables
equal transformers' rotation before and past the original context (longrope switching per row as transformers does
per sequence); GGUF export writes what llama.cpp needs to rotate the same way (scaling keys, rope_freqs, longrope's
factor tensors), and the file imports back as the same model; what llama.cpp cannot do is refused before writing."""

from __future__ import annotations

import pytest
import torch
from conftest import build_family_model

ORIGINAL = 16  # the tiny models' "pretraining" context: the test sequences cross it
ROPES = {
    "linear": ("mistral", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama3": ("mistral", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "longrope": ("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
                          "partial_rotary_factor": 1.0,
                          "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.5, 4.0, 9.0, 20.0]}),
    "dynamic": ("qwen2", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
}


def _model(tmp_path, kind: str):
    fam, rope = ROPES[kind]
    # longrope's attention factor comes from max_position_embeddings / original (here 4)
    extra = {"original_max_position_embeddings": ORIGINAL} if fam == "phi3" else {}  # (Phi-3's config keeps its own)
    return build_family_model(tmp_path / kind, fam, rope_parameters=dict(rope), max_position_embeddings=4 * ORIGINAL, **extra)


@pytest.mark.parametrize("kind", list(ROPES))
def test_the_lean_forward_rotates_as_transformers_does_across_the_original_context(tmp_path, kind):
    """Prefill short of and past the original context, then one-token steps of two rows crossing it (one row past it
    while the other is not: longrope picks per row) - every logit as transformers' forward gives it for that
    sequence with its cache."""
    from slmkit.engine.torch_backend import TorchBackend

    backend = TorchBackend.from_folder(_model(tmp_path, kind))
    fast, net = backend.fast, backend.model
    assert fast is not None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (1, n), generator=g) for n in (ORIGINAL - 4, ORIGINAL + 9)]
    with torch.inference_mode():
        for ids in prompts:  # a whole prompt at once
            lean = fast.forward(fast.new_cache(1), ids, every=True)[0]
            torch.testing.assert_close(lean, net(input_ids=ids).logits[0], atol=1e-4, rtol=1e-4)
        cache = fast.new_cache(2)
        rows = [prompts[0][0, :ORIGINAL - 6], prompts[1][0, :ORIGINAL - 2]]
        for slot, ids in enumerate(rows):
            fast.forward(cache, ids[None], first=slot)
        hf = [net(input_ids=ids[None], use_cache=True) for ids in rows]
        for step in range(10):  # row 1 crosses the original context after 2 steps, row 0 after 6
            nxt = torch.tensor([[3 + step], [40 + step]])
            lean = fast.forward(cache, nxt)
            for r in range(2):
                hf[r] = net(input_ids=nxt[r:r + 1], past_key_values=hf[r].past_key_values, use_cache=True)
                torch.testing.assert_close(lean[r], hf[r].logits[0, -1], atol=1e-4, rtol=1e-4, msg=f"{kind} step {step} row {r}")


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn", "longrope"])
def test_a_scaled_rope_exports_to_gguf_that_llamacpp_rotates_as_transformers_does(home, tmp_path, kind):
    """The exported F32 file gives llama.cpp's log-probabilities within its float16 cache's error of transformers' on
    a text longer than the original context, and (longrope, whose factors llama.cpp picks by the context it is given,
    transformers by the positions it sees) the same greedy tokens within the original context; it imports back as
    the same model."""
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.sampling import SamplingParams
    from slmkit.engine.torch_backend import TorchBackend
    from slmkit.export.gguf import export_gguf
    from slmkit.sources.importer import import_path
    from slmkit.store import Store

    src = _model(tmp_path, kind)
    gguf = export_gguf(src, tmp_path / "out", name="tiny", gguf_type="F32")
    torch_b = TorchBackend.from_folder(src)
    ids = torch_b.encode("The quick brown fox jumps over the lazy dog and runs far away")[: 3 * ORIGINAL]
    assert len(ids) > 2 * ORIGINAL
    cpp = LlamaCppBackend(gguf, threads=2, n_ctx=ORIGINAL)  # (its scorer runs at the model's whole context)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    try:
        a, b = torch_b.score_batch([(ids, 1)])[0], cpp.score_batch([(ids, 1)])[0]
        assert max(abs(x - y) for x, y in zip(a, b)) < 3e-3
        prompt = ids[: ORIGINAL // 2]
        assert list(cpp.stream_tokens(prompt, greedy, 6)) == list(torch_b.stream_tokens(prompt, greedy, 6))
    finally:
        cpp.close()
    import_path(gguf, "back")
    back = TorchBackend.from_folder(Store().path("back"))
    t = torch.tensor([ids])
    with torch.inference_mode():
        torch.testing.assert_close(back.model(input_ids=t).logits, torch_b.model(input_ids=t).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,fam,why", [
    ("dynamic", "qwen2", "no llama.cpp equivalent"),
    ("llama3", "qwen2", "for LLAMA models only"),
    ("longrope", "qwen2", "for PHI3 models only"),
    ("yarn", "qwen2", "sets its own attention factor"),
])
def test_a_rope_llamacpp_would_rotate_otherwise_is_refused_before_export(tmp_path, kind, fam, why):
    from slmkit.errors import SlmkitError
    from slmkit.export.gguf import export_gguf

    rope = dict(ROPES[kind][1], **({"attention_factor": 1.5} if kind == "yarn" else {}))
    src = build_family_model(tmp_path / kind, fam, rope_parameters=rope, max_position_embeddings=4 * ORIGINAL)
    with pytest.raises(SlmkitError, match=why):
        export_gguf(src, tmp_path / "out", name="x", gguf_type="F32")
    assert not (tmp_path / "out").exists()
