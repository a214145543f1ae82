"""Weight-only quantization: the math, the integer layers, the store stage and its errors."""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.compress import quant_ops as qo
from slmkit.layers.int_packing import pack_nibbles, unpack_nibbles
from slmkit.layers.integer import Int4Linear, Int8Linear, W4A8Linear, W8A8Linear
from slmkit.compress.quantize import quantize_layer
from slmkit.compress.quantize_stage import quantize_stage
from slmkit.errors import SlmkitError
from slmkit.store import Store

runner = CliRunner()


def test_int8_and_int4_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s = qo.quantize_int8(w)
    assert q.dtype == torch.int8 and (qo.dequantize_int8(q, s) - w).abs().max() <= s.max() / 2 + 1e-6
    q4, scale, lo = qo.quantize_int4(w, 32)
    assert int(q4.max()) <= 15 and scale.shape == (64, 4)
    err = (qo.dequantize_int4(q4, scale, lo) - w).abs().reshape(64, 4, 32).amax(-1)
    assert bool((err <= scale / 2 + 1e-6).all())
    assert torch.equal(unpack_nibbles(pack_nibbles(q4)), q4)
    with pytest.raises(ValueError):
        qo.quantize_int4(torch.randn(4, 48), 32)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    k = 64
    mix = torch.randn(k, k) * 0.3 + torch.eye(k)
    x = torch.randn(2048, k) @ mix  # correlated input channels, as in real layers
    w = torch.randn(32, k)
    h = 2 * x.T @ x / x.shape[0]
    scales = qo.int8_scales(w) * 40  # a coarse grid, so that rounding error matters
    rtn = torch.round(w / scales[:, None]) * scales[:, None]
    opt = qo.gptq(w, h, lambda col, _i: torch.round(col / scales) * scales)
    assert torch.allclose(torch.round(opt / scales[:, None]) * scales[:, None], opt, atol=1e-5)  # on the grid
    err = lambda q: float(((x @ w.T) - (x @ q.T)).pow(2).mean())
    assert err(opt) < 0.8 * err(rtn)


@pytest.mark.parametrize("scheme, method", [("int8", "rtn"), ("int4", "rtn"), ("int8", "gptq"), ("int4", "gptq"), ("int4", "awq"),
                                            ("w8a8", "rtn"), ("w8a8", "gptq"), ("w4a8", "rtn"), ("w4a8", "gptq")])
def test_quantized_layer_matches_its_dequantized_weights(scheme, method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(300, 64)
    stat = {"H": 2 * x.T @ x / 300, "absmean": x.abs().mean(0), "sample": x[:64]}
    layer = quantize_layer(lin, scheme, 32 if scheme in ("int4", "w4a8") else None, method, stat)
    assert type(layer) is {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear, "w4a8": W4A8Linear}[scheme]
    with torch.no_grad():
        y, ref = layer(x[:5]), lin(x[:5])
    assert y.shape == ref.shape and y.dtype == x.dtype
    rel = float((y - ref).norm() / ref.norm())
    assert rel < {"int8": 0.03, "w8a8": 0.04, "int4": 0.25, "w4a8": 0.25}[scheme]


def test_quantize_stage_saves_a_loadable_smaller_model(store):
    card = quantize_stage("tiny", "int8")
    assert card.name == "tiny-int8-rtn" and card.stage == "quantize" and card.parent == "tiny"
    assert card.settings["scheme"] == "int8" and card.parameters == Store().card("tiny").parameters
    assert card.weights_bytes["safetensors"] < Store().card("tiny").weights_bytes["safetensors"]
    fp, q = slmkit.load("tiny"), slmkit.load("tiny-int8-rtn")
    assert any(isinstance(m, Int8Linear) for m in q.backend.model.modules())
    text = "The quick brown fox jumps over the lazy dog."
    a, b = fp.score(text), q.score(text)
    assert abs(a.mean - b.mean) < 0.05 * abs(a.mean)  # int8 barely moves the log-likelihood
    assert q.generate("The", temperature=0, max_tokens=4) is not None
    import yaml

    front = yaml.safe_load((Store().require(card.name) / "card.md").read_text().split("---\n")[1])
    assert front["base_model"] == "tiny" and front["tags"] == ["slmkit", "quantize", "int8", "rtn"]


def test_w4a8_keeps_an_int8_output_head_that_reloads_exactly(store):
    """w4a8's default output head is w8a8 (float32 scales kept through the file); the child reloads to the same logits,
    in slmkit's own (guarded) layout; --head w4a8 makes a 4-bit head; a head that does not go with the scheme, or a
    head of its own with --portable, is refused before anything loads."""
    from slmkit.compress.quantize import quantize_model
    from slmkit.card import read_config
    from slmkit.sources.forms import is_standard, load_quantized
    from slmkit.sources.hf_dir import load_float

    card = quantize_stage("tiny", "w4a8")
    assert card.name == "tiny-w4a8-g32-rtn" and card.settings["head"] == {"module": "lm_head", "scheme": "w8a8"}
    folder = Store().require(card.name)
    assert not is_standard(folder) and read_config(folder)["slmkit_layout"]["kind"] == "embedding-from-head"
    loaded = load_quantized(folder)
    assert type(loaded.lm_head) is W8A8Linear and loaded.lm_head.scales.dtype == torch.float32
    assert all(type(m) is W4A8Linear for n, m in loaded.named_modules() if n.endswith(("q_proj", "down_proj")))
    net, _ = load_float(Store().require("tiny"), dtype=torch.float32)
    quantize_model(net, "w4a8")
    for p in net.parameters():  # embeddings and norms are saved in bf16
        p.data = p.data.to(torch.bfloat16).float()
    ids = torch.tensor([[1, 5, 9, 13, 40, 7]])
    with torch.no_grad():
        assert torch.equal(net.lm_head.scales, loaded.lm_head.scales) and torch.equal(net.lm_head.weight, loaded.lm_head.weight)
        torch.testing.assert_close(loaded(input_ids=ids).logits, net.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    four = quantize_stage("tiny", "w4a8", head="w4a8")
    assert four.name == "tiny-w4a8-g32-head-w4a8-rtn" and "head" not in four.settings
    assert type(load_quantized(Store().require(four.name)).lm_head) is W4A8Linear
    eight = quantize_stage("tiny", "w8a8", head="w4a8", group_size=32)  # a w8a8 body with a 4-bit head
    assert eight.name == "tiny-w8a8-head-w4a8-rtn" and eight.settings["group_size"] == 32
    m = slmkit.load(eight.name)
    assert type(m.backend.model.lm_head) is W4A8Linear and m.backend.model.lm_head.group_size == 32
    assert all(type(x) is W8A8Linear for n, x in m.backend.model.named_modules() if n.endswith("down_proj"))
    assert m.generate("The", temperature=0, max_tokens=4) is not None
    before = Store().names()
    for head, portable in (("int8", False), ("w8a8", True)):
        with pytest.raises(SlmkitError, match="--head"):
            quantize_stage("tiny", "w4a8", head=head, portable=portable, name="nope")
    assert Store().names() == before


def test_w4a8_reads_its_embedding_from_the_integer_head(store, tmp_path):
    """A tied model's w4a8 child keeps no float embedding table: a token's embedding is the integer head's row
    (dequantized), on the lean forward and transformers' forward alike; --embedding separate keeps the table (a bigger
    file, the float rows); to_float gives the family's embedding back with the head's rows; refused where it cannot be."""
    from safetensors import safe_open

    from slmkit.layers.integer import HeadEmbedding, to_float
    from slmkit.sources.forms import load_quantized

    card = quantize_stage("tiny", "w4a8")
    sep = quantize_stage("tiny", "w4a8", embedding="separate", name="tiny-sep")
    assert card.settings["embedding"] == {"from": "lm_head"} and "embedding" not in sep.settings
    four = quantize_stage("tiny", "w8a8", head="w4a8", embedding="head")  # asked for: read from a 4-bit head
    assert four.settings["embedding"] == {"from": "lm_head"}
    assert "embedding" not in quantize_stage("tiny", "w4a8", head="w4a8").settings  # by default only from an 8-bit head
    assert four.name == "tiny-w8a8-head-w4a8-embedding-head-rtn"
    folder = Store().require(card.name)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not any("embed_tokens" in k for k in f.keys())
    assert card.weights_bytes["safetensors"] < sep.weights_bytes["safetensors"]
    net = load_quantized(folder)
    emb = net.get_input_embeddings()
    ids = torch.tensor([[1, 5, 9, 13, 40, 7]])
    assert isinstance(emb, HeadEmbedding) and emb.weight.shape == (320, 32) and emb.weight.device.type == "meta"
    assert torch.equal(emb(ids)[0], net.lm_head.dequantized(ids[0]))
    from slmkit.engine import lean_forward

    lean_forward.KV_BF16 = False  # transformers' attention reads float32 keys: compare like with like
    try:
        m = slmkit.load(card.name)
    finally:
        lean_forward.KV_BF16 = True
    fast = m.backend.fast
    assert fast is not None
    with torch.inference_mode():
        got = fast.forward(fast.new_cache(1), ids)[0].float()
        want = m.backend.model(input_ids=ids).logits[0, -1].float()
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert m.generate("The", temperature=0, max_tokens=4) is not None
    dense = to_float(load_quantized(folder)).get_input_embeddings()
    assert type(dense) is torch.nn.Embedding and torch.equal(dense.weight, net.lm_head.dequantized())
    for kwargs in ({"embedding": "head", "portable": True}, {"embedding": "head", "method": "smoothquant"}, {"embedding": "rows"}):
        with pytest.raises(SlmkitError, match="embedding"):
            quantize_stage("tiny", "w4a8", name="nope", **kwargs)
    assert not Store().exists("nope")


def test_int4_gptq_stage_with_calibration(store, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Paris is the capital of France. The quick brown fox jumps over the lazy dog. " * 40)
    card = quantize_stage("tiny", "int4", method="gptq", group_size=32, calib=calib, name="t4")
    assert card.settings["calibration"]["windows"] >= 1 and card.settings["group_size"] == 32
    m = slmkit.load("t4")
    assert any(isinstance(x, Int4Linear) for x in m.backend.model.modules())
    assert not any(p.is_meta for p in m.backend.model.parameters())
    # a multi-token prompt: the last position's hidden state is a strided view, which the kernels must accept
    gen = m.stream("Paris is the capital of France and", temperature=0, max_tokens=3, repetition_penalty=1.0)
    gen.read()
    assert gen.stats.completion_tokens >= 1


def test_quantize_errors_leave_the_store_unchanged(store, tmp_path):
    quantize_stage("tiny", "int8", name="q8")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    before = snapshot(store.root)
    cases = [
        (dict(model="q8", scheme="int4"), "already quantized"),
        (dict(model="tiny", scheme="int3"), "unknown scheme"),
        (dict(model="tiny", scheme="int4", method="gptq"), "needs calibration"),
        (dict(model="tiny", scheme="int4", method="gptq", calib=tmp_path / "missing.txt"), "not found"),
        (dict(model="tiny", scheme="int4", method="awq", calib=empty), "is empty"),
        (dict(model="tiny", scheme="int4", group_size=64), "does not divide"),
        (dict(model="tiny", scheme="int8", calib=empty), "gptq and awq only"),
        (dict(model="tiny", scheme="int8", name="../x"), "invalid model name"),
        (dict(model="tiny", scheme="int4", method="smoothquant"), "balances int8 activations"),
    ]
    for kwargs, message in cases:
        model = kwargs.pop("model")
        scheme = kwargs.pop("scheme")
        with pytest.raises(SlmkitError, match=message):
            quantize_stage(model, scheme, **kwargs)
        assert snapshot(store.root) == before, message


def test_quantize_cli(store):
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "int4", "--group-size", "32", "--no-ppl"])
    assert r.exit_code == 0, r.output
    assert "made tiny-int4-g32-rtn" in r.stdout and "smaller" in r.stdout
    r = runner.invoke(app, ["quantize", "tiny-int4-g32-rtn", "--no-ppl"])
    assert r.exit_code == 1 and "already quantized" in r.stderr


@pytest.mark.parametrize("scheme, method", [("int8", "rtn"), ("int4", "gptq"), ("w8a8", "rtn"), ("w4a8", "gptq")])
def test_children_load_in_transformers_in_compressed_tensors_layout(store, calib, scheme, method):
    """Other tools read a quantized child right: transformers (through compressed-tensors) computes what slmkit's
    integer layers hold, and the config block is valid for compressed-tensors' own classes (what vLLM parses)."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from slmkit.compress.quantize import for_training
    from slmkit.layers.integer import to_float
    from slmkit.sources.forms import is_standard, load_quantized
    from slmkit.card import read_config

    card = quantize_stage("tiny", scheme, method=method, calib=calib if method == "gptq" else None, portable=True)
    folder = Store().require(card.name)
    assert is_standard(folder)
    block = read_config(folder)["quantization_config"]
    parsed = QuantizationConfig.model_validate(block)
    args = parsed.config_groups["group_0"].weights
    assert block["quant_method"] == "compressed-tensors"
    assert parsed.format == ("int-quantized" if scheme == "w8a8" else "pack-quantized")
    four = scheme in ("int4", "w4a8")
    assert (args.num_bits, args.strategy) == ((4, "group") if four else (8, "channel"))
    acts = parsed.config_groups["group_0"].input_activations  # w8a8, w4a8: int8 per token, quantized at run time
    assert (acts is None) == (scheme in ("int8", "int4"))
    if acts is not None:  # w8a8: per token; w4a8: per token and group of the weight's group size
        assert acts.dynamic and (acts.strategy, acts.group_size) == (("token", None) if scheme == "w8a8" else ("group", args.group_size))
    try:
        theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except RuntimeError as exc:  # int4 (asymmetric): transformers 5.24 + compressed-tensors 0.20 shape the packed zero
        assert four and "mismatch" in str(exc)  # point wrongly on their default path: loud, never garbage
        theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                      quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.tensor([[1, 5, 9, 13, 40, 7]])
    with torch.no_grad():
        # slmkit's integers, dequantized; for w8a8 its own layers in float32 (the activations quantized as transformers
        # does); w4a8 loads in transformers only on its dequantize path (as int4), which keeps activations in float
        exact = (for_training if scheme == "w8a8" else to_float)(load_quantized(folder))(input_ids=ids).logits
        served = slmkit.load(card.name).backend.model(input_ids=ids).logits.float()  # slmkit's bf16 kernels
        got = theirs(input_ids=ids).logits
    # int4: transformers dequantizes (q - zero_point) * scale in the scale's dtype (bf16), so its weights sit one bf16
    # rounding from the exact grid values; int8 and w8a8 agree to float32 rounding
    q_proj = theirs.model.layers[0].self_attn.q_proj.weight  # the weights transformers decompressed
    ours = to_float(load_quantized(folder)).model.layers[0].self_attn.q_proj.weight
    weight_tol = 2 ** -7 * float(ours.abs().max()) if four else 1e-6
    assert torch.allclose(q_proj, ours, atol=weight_tol), float((q_proj - ours).abs().max())
    logit_tol = 0.02 * float(got.abs().max()) if four else 1e-4
    assert torch.allclose(got, exact, atol=logit_tol), float((got - exact).abs().max())
    assert float((got - served).abs().max()) < 0.05 * float(got.abs().max())


def test_layouts_without_a_standard_form_make_other_loaders_fail_loudly(store, calib):
    """AWQ-smoothed and low-rank children load in slmkit but stop transformers instead of loading garbage."""
    from transformers import AutoModelForCausalLM

    from slmkit.compress.lowrank_stage import lowrank_stage
    from slmkit.sources.forms import is_standard

    for card in (quantize_stage("tiny", "int4", method="awq", calib=calib), lowrank_stage("tiny", ratio=0.6, calib=calib)):
        folder = Store().require(card.name)
        assert isinstance(slmkit.load(card.name).generate("The quick", max_tokens=3, temperature=0), str)
        with pytest.raises(ValueError, match="does not recognize this architecture"):
            AutoModelForCausalLM.from_pretrained(str(folder))
    assert not is_standard(Store().require("tiny-int4-g32-awq"))


def test_children_saved_by_earlier_versions_still_load(store):
    """slmkit <= 0.5 saved the integer layers' own buffers (no quantization_config): still read."""
    import json

    from safetensors.torch import save_file

    from slmkit.compress.quantize import quantize_model
    from slmkit.sources.forms import QUANT_KEY, is_standard, load_quantized
    from slmkit.sources.hf_dir import load_float

    card = quantize_stage("tiny", "int4")
    folder = Store().require(card.name)
    net, _ = load_float(Store().require("tiny"), dtype=torch.float32)
    quantize_model(net, "int4")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    assert QUANT_KEY in config and not is_standard(folder)
    old = load_quantized(folder)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(old(input_ids=ids).logits.float(), net(input_ids=ids).logits.float(), atol=0.05)


def test_smoothquant_child_folds_its_scales_and_stays_standard(store):
    """--method smoothquant without --calib: the packaged sample calibrates it (recorded in the card), the scales go
    into the norms (no smoothing vector in the child), and it is saved in the standard layout."""
    from slmkit.sources.forms import is_standard

    card = quantize_stage("tiny", "w8a8", method="smoothquant")
    assert card.settings["calibration"]["file"].startswith("packaged") and card.settings["smoothquant"]["modules"] > 0
    assert card.settings["format"].startswith("compressed-tensors") and is_standard(Store().require(card.name))
    q, f = slmkit.load(card.name), slmkit.load("tiny")
    assert all(getattr(m, "smooth", None) is None for m in q.backend.model.modules())
    ids = torch.tensor([[1, 5, 9, 13, 40, 7]])
    with torch.no_grad():
        got, want = q.backend.model(input_ids=ids).logits.float(), f.backend.model(input_ids=ids).logits.float()
    assert float((got - want).norm() / want.norm()) < 0.1


def test_smoothing_through_the_values_keeps_the_float_model_with_grouped_query_attention(tmp_path):
    """SmoothQuant's v -> o mapping under GQA (4 query heads on 2 KV heads): dividing value channel j by s_j and
    multiplying o's input channel of every query head reading it by s_j computes the same model; and the search
    through smooth_model, on calibration statistics, keeps it the same too."""
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM

    from slmkit.compress import smooth_ops as so
    from slmkit.compress.calibrate import collect_stats
    from slmkit.compress.quantize import smooth_model
    from slmkit.layers.walk import linear_layers

    net = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "m")).float().eval()
    ids = torch.randint(0, net.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = net(input_ids=ids).logits
        attn = net.model.layers[0].self_attn
        s = torch.rand(attn.v_proj.out_features) * 3 + 0.2
        attn.v_proj.weight.div_(s[:, None])
        attn.o_proj.weight.mul_(so.spread_heads(s, 4, 2))
        torch.testing.assert_close(net(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(so.group_heads(so.spread_heads(s, 4, 2), 4, 2), s)
    stats = collect_stats(net, linear_layers(net), [ids[:1], ids[1:]], hessian=False)
    chosen = smooth_model(net, stats)
    assert chosen  # something was smoothed
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=ids).logits, want, atol=1e-4, rtol=1e-3)


def test_a_child_only_slmkit_reads_says_so_and_portable_keeps_to_the_standard(store, monkeypatch):
    """Where int4's free minimums fit far better (a model from a Q4_1 GGUF, as the default; forced here), the child is
    in slmkit's own layout and quantize says so, with the flag that makes a portable one; --portable gives a
    compressed-tensors child; AWQ with --portable is refused."""
    from typer.testing import CliRunner

    import slmkit.compress.quantize as q
    from slmkit.cli import app
    from slmkit.sources.forms import is_standard

    monkeypatch.setattr(q, "choose_int4_grid", lambda layers, group: "float")
    runner = CliRunner()
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "int4", "--no-ppl", "--name", "own"])
    assert r.exit_code == 0 and "note: saved in slmkit's own" in r.output and "--portable" in r.output, r.output
    assert not is_standard(Store().require("own")) and "--portable" in Store().card("own").settings["format"]
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "int4", "--no-ppl", "--portable", "--name", "std"])
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    assert is_standard(Store().require("std")) and Store().card("std").settings["format"].startswith("compressed-tensors")
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "int4", "--method", "awq", "--calib", __file__, "--portable"])
    assert r.exit_code == 1 and "no compressed-tensors form" in r.output
