"""GGUF export and the llama.cpp backend, on tiny random models: same tokens, same greedy output as PyTorch."""

from __future__ import annotations

import json
import pytest
from conftest import build_tiny_llama, snapshot
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.engine.llamacpp_backend import LlamaCppBackend
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.torch_backend import TorchBackend
from slmkit.errors import SlmkitError
from slmkit.export.gguf import export_gguf
from slmkit.sources.importer import import_path
from slmkit.store import Store

PROMPTS = ["The quick brown fox", "Paris is 123 the capital of", "héllo wörld 😀", "def add(a, b):\n"]
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
runner = CliRunner()


@pytest.mark.parametrize(
    "shape", [{}, {"layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 48}], ids=["tiny", "pruned-shape"]
)
def test_f32_gguf_agrees_with_torch_token_for_token(tmp_path, shape):
    src = build_tiny_llama(tmp_path / "src", **shape)
    gguf = export_gguf(src, tmp_path / "out", name="m", gguf_type="F32")
    torch_b, cpp_b = TorchBackend.from_folder(src), LlamaCppBackend(gguf, threads=2)
    assert cpp_b.vocab_size == torch_b.vocab_size and cpp_b.eos_token_ids == torch_b.eos_token_ids
    for text in PROMPTS:
        ids = torch_b.encode(text)
        assert cpp_b.encode(text) == ids
        assert list(cpp_b.stream_tokens(ids, GREEDY, 24)) == list(torch_b.stream_tokens(ids, GREEDY, 24))
        a, b = torch_b.score_batch([(ids, 1)])[0], cpp_b.score_batch([(ids, 1)])[0]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert cpp_b.render_chat(messages) == torch_b.render_chat(messages)
    cpp_b.close()


def test_quantized_export_is_smaller_and_has_a_modelfile(tmp_path, tiny_dir):
    f32 = export_gguf(tiny_dir, tmp_path, name="t-f32", gguf_type="F32")
    q8 = export_gguf(tiny_dir, tmp_path, name="t-q8", gguf_type="Q8_0")
    assert q8.stat().st_size < 0.6 * f32.stat().st_size
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./t-q8.gguf\n")
    assert 'TEMPLATE """' in modelfile and "{{ .Content }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary files left
    b = LlamaCppBackend(q8, threads=2)
    assert len(list(b.stream_tokens(b.encode("The quick"), GREEDY, 5))) >= 1
    b.close()


def test_export_cli_installs_and_runs_on_llamacpp(store):
    r = runner.invoke(app, ["export", "tiny", "--type", "Q8_0", "--name", "tiny-q8", "--no-ppl"])
    assert r.exit_code == 0, r.output
    assert "Modelfile" in r.stdout and "installed tiny-q8" in r.stdout
    card = Store().card("tiny-q8")
    assert card.stage == "export" and card.parent == "tiny" and card.settings["type"] == "Q8_0"
    assert card.parameters == Store().card("tiny").parameters and "gguf" in card.weights_bytes
    r = runner.invoke(app, ["run", "tiny-q8", "--backend", "llamacpp", "--temperature", "0", "-n", "5", "hi"])
    assert r.exit_code == 0, r.output
    # the torch backend reads the GGUF-only model too (dequantized)
    assert isinstance(slmkit.load("tiny-q8").generate("The", max_tokens=3), str)


def test_export_errors_leave_the_store_unchanged(store, tmp_path, tiny_dir):
    import_path(tiny_dir, "weird")
    config_path = Store().path("weird") / "config.json"  # an architecture export has no table for
    config = json.loads(config_path.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config_path.write_text(json.dumps(config))
    before = snapshot(store.root)
    for args, message in [
        (["export", "tiny", "--type", "Q3_XYZ"], "unknown GGUF type 'Q3_XYZ'"),
        (["export", "weird", "--type", "F32"], "does not support the architecture 'GPT2LMHeadModel'"),
        (["export", "tiny", "--format", "onnx"], "unknown export format"),
        (["export", "nosuch"], "no model named 'nosuch'"),
        (["export", "tiny", "--name", "tiny"], "already exists"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
        assert snapshot(store.root) == before
    assert "LlamaForCausalLM" in runner.invoke(app, ["export", "weird"]).stderr  # lists what is supported


def test_llamacpp_backend_needs_a_gguf(store):
    with pytest.raises(SlmkitError, match="no GGUF file") as e:
        slmkit.load("tiny", backend="llamacpp")
    assert "slmkit export tiny" in e.value.hint
