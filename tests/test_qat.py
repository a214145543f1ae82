"""Quantization-aware training onto llama.cpp's grid (#31): `slmkit quantize --scheme gguf:Q4_0 --method qat` trains
the block weights onto the Q4_0 grid, and the exported GGUF holds exactly the trained values (no second rounding)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.compress import gguf_grid_ops as gg
from slmkit.export.gguf import permute_rotary

runner = CliRunner()
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def test_qat_trains_onto_the_grid_and_the_gguf_holds_exactly_those_values(store, calib, tmp_path):
    from safetensors.torch import load_file

    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "gguf:Q4_0", "--method", "qat", "--data", str(calib), "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "made tiny-q40-qat" in r.output and "llama.cpp's Q4_0 grid" in r.output
    card = store.card("tiny-q40-qat")
    assert card.stage == "qat" and card.parent == "tiny" and card.settings["qat"]["type"] == "Q4_0" and card.settings["steps"] == 4
    child = load_file(str(store.require("tiny-q40-qat") / "model.safetensors"))
    parent = load_file(str(store.require("tiny") / "model.safetensors"))
    linear = [k for k in child if any(f".{n}." in k for n in GGUF_NAMES)]
    assert len(linear) == 14
    moved = 0
    for k in linear:
        assert torch.equal(gg.grid(child[k], "Q4_0"), child[k]), k  # on the grid
        moved += not torch.equal(child[k], gg.grid(parent[k], "Q4_0"))  # and not just the parent rounded
    assert moved > 0
    assert torch.equal(child["model.embed_tokens.weight"], parent["model.embed_tokens.weight"])  # frozen

    r = runner.invoke(app, ["export", "tiny-q40-qat", "--no-ppl", "--out", str(tmp_path / "gguf")])  # its type by default
    assert r.exit_code == 0, r.output
    reader = GGUFReader(str(next((tmp_path / "gguf").glob("*.gguf"))))
    tensors = {t.name: t for t in reader.tensors}
    heads, kv = 4, 2  # the tiny model's: the export permutes q and k rows by head for llama.cpp's rotary layout
    for k in linear:
        layer = k.split(".")[2]
        part = next(v for n, v in GGUF_NAMES.items() if f".{n}." in k)
        t = tensors[f"blk.{layer}.{part}.weight"]
        assert t.tensor_type == GGMLQuantizationType.Q4_0, (k, t.tensor_type)
        got = dequantize(t.data, GGMLQuantizationType.Q4_0).reshape(child[k].shape)
        want = child[k].numpy()
        if part in ("attn_q", "attn_k"):
            want = permute_rotary(want, heads if part == "attn_q" else kv)
        assert np.array_equal(got, want), k  # equal values (a zero's sign aside: the straight-through sum makes +0)


def test_qat_refuses_what_it_cannot_train(store, calib):
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "gguf:Q3_K", "--method", "qat", "--data", str(calib)])
    assert r.exit_code == 1 and "gguf:Q4_0" in r.output and "slmkit export" in r.output
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "gguf:Q4_0", "--method", "qat"])
    assert r.exit_code == 1 and "--data" in r.output
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "int8", "--method", "qat", "--data", str(calib)])
    assert r.exit_code == 1 and "--scheme gguf:TYPE --method qat" in r.output
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "gguf:Q4_0", "--data", str(calib)])
    assert r.exit_code == 1 and "--scheme gguf:TYPE --method qat" in r.output
    assert not any(store.root.glob("tiny-q*"))  # nothing made