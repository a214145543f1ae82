"""GGUF export and the llama.cpp backend, on tiny random models: same tokens, same greedy output as PyTorch."""

from __future__ import annotations

import json
import pytest
from conftest import build_tiny_llama, snapshot
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.compress.quantize_stage import quantize_stage
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
    before = snapshot(Store().root)  # but it has no float weights to export again
    r = runner.invoke(app, ["export", "tiny-q8", "--type", "Q4_0", "--no-ppl", "--name", "again"])
    assert r.exit_code == 1 and "holds only a GGUF file" in r.stderr and "slmkit export tiny --type Q4_0" in r.stderr
    assert snapshot(Store().root) == before
    quantize_stage("tiny", "int8")  # PyTorch integer weights cannot be exported either
    before = snapshot(Store().root)
    r = runner.invoke(app, ["export", "tiny-int8-rtn", "--type", "Q4_0", "--no-ppl"])
    assert r.exit_code == 1 and "holds PyTorch integer weights" in r.stderr and "slmkit export tiny" in r.stderr
    assert snapshot(Store().root) == before


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


CALIB_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France; 12 + 30 = 42.\n" * 40


def test_imatrix_is_mean_squared_input_and_guides_llamacpp(tmp_path, tiny_dir):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmkit.export.imatrix import compute_imatrix, load_or_compute, read_imatrix_gguf, write_imatrix_gguf

    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    imat = compute_imatrix(tiny_dir, calib, window=32, samples=4)
    assert imat.chunk_count == 4 and imat.chunk_size == 32
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"} <= set(imat.sums)
    means = imat.means()
    assert means["blk.1.ffn_down.weight"].shape == (64,) and means["blk.0.attn_q.weight"].shape == (32,)
    # independent check: q_proj of layer 0 sees input_layernorm(embeddings); its imatrix is that squared, averaged
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    net = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    ids = tok.encode(CALIB_TEXT, add_special_tokens=False)[:128]
    with torch.no_grad():
        x = torch.cat([net.model.layers[0].input_layernorm(net.model.embed_tokens(torch.tensor([ids[i:i + 32]])))[0]
                       for i in range(0, 128, 32)])
    np.testing.assert_allclose(means["blk.0.attn_q.weight"], x.square().mean(0).numpy(), rtol=1e-4)
    np.testing.assert_allclose(means["blk.0.attn_v.weight"], means["blk.0.attn_q.weight"])  # same input
    # the llama.cpp imatrix GGUF round-trips
    write_imatrix_gguf(imat, tmp_path / "imatrix.gguf")
    back, computed = load_or_compute(tmp_path / "imatrix.gguf", tiny_dir)
    assert not computed and back.counts == imat.counts and back.chunk_count == 4
    for k, v in means.items():
        np.testing.assert_allclose(back.means()[k], v, rtol=1e-6)
    assert read_imatrix_gguf(tmp_path / "imatrix.gguf").datasets == [str(calib)]
    # llama.cpp uses it: Q4_0 rounds differently with an importance matrix
    plain = export_gguf(tiny_dir, tmp_path / "a", name="m", gguf_type="Q4_0")
    guided = export_gguf(tiny_dir, tmp_path / "b", name="m", gguf_type="Q4_0", imatrix=means)
    assert plain.read_bytes() != guided.read_bytes()
    b = LlamaCppBackend(guided, threads=2)
    assert len(list(b.stream_tokens(b.encode("The quick"), GREEDY, 5))) >= 1
    b.close()


def test_export_cli_imatrix_writes_a_reusable_matrix(store, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    r = runner.invoke(app, ["export", "tiny", "--type", "Q4_0", "--imatrix", str(calib), "--out", str(tmp_path / "e1"),
                            "--name", "tiny-q4", "--no-ppl"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e1" / "imatrix.gguf").is_file() and "importance matrix of" in r.stdout
    card = Store().card("tiny-q4")
    assert card.settings["imatrix"]["computed"] and card.settings["imatrix"]["tensors"] >= 15
    r = runner.invoke(app, ["export", "tiny", "--type", "Q4_0", "--imatrix", str(tmp_path / "e1" / "imatrix.gguf"),
                            "--out", str(tmp_path / "e2"), "--no-ppl"])
    assert r.exit_code == 0, r.output
    import gguf

    first, second = (gguf.GGUFReader(str(tmp_path / d / "tiny-q4_0-imat.gguf")) for d in ("e1", "e2"))
    # the same matrix read back makes the same weights (the metadata names each run's imatrix source)
    assert [t.name for t in first.tensors] == [t.name for t in second.tensors]
    assert all(a.data.tobytes() == b.data.tobytes() for a, b in zip(first.tensors, second.tensors))
    assert first.fields["quantize.imatrix.dataset"].contents().endswith("calib.txt")


def test_export_imatrix_errors(store, tmp_path, tiny_dir):
    import numpy as np

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    not_imatrix = export_gguf(tiny_dir, tmp_path / "f", name="m", gguf_type="F32")
    from slmkit.export.imatrix import Imatrix, write_imatrix_gguf

    other_model = tmp_path / "other.imatrix.gguf"  # right names, wrong widths: made for a wider model
    write_imatrix_gguf(Imatrix({"blk.0.attn_q.weight": np.ones(64)}, {"blk.0.attn_q.weight": 10}), other_model)
    foreign = tmp_path / "foreign.imatrix.gguf"
    write_imatrix_gguf(Imatrix({"enc.0.conv.weight": np.ones(8)}, {"enc.0.conv.weight": 10}), foreign)
    before = snapshot(store.root)
    for args, message in [
        (["--type", "Q4_0", "--imatrix", str(tmp_path / "missing.txt")], "not found"),
        (["--type", "Q4_0", "--imatrix", str(empty)], "is empty"),
        (["--type", "Q4_0", "--imatrix", str(blank)], "is empty"),
        (["--type", "F16", "--imatrix", str(blank)], "F16 is not quantized"),
        (["--type", "Q4_0", "--imatrix", str(not_imatrix)], "not an importance matrix"),
        (["--type", "Q4_0", "--imatrix", str(other_model)], "which takes 32 inputs"),
        (["--type", "Q4_0", "--imatrix", str(foreign)], "names none of this model's weights"),
    ]:
        r = runner.invoke(app, ["export", "tiny", *args, "--name", "x", "--no-ppl"])
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
        assert snapshot(store.root) == before


def test_llamacpp_static_batch_equals_one_at_a_time(tmp_path, tiny_dir):
    """generate_batch (the speed test's batched rate) decodes rows together; each row is what it gets alone."""
    gguf = export_gguf(tiny_dir, tmp_path, name="t", gguf_type="F32")
    b = LlamaCppBackend(gguf, threads=2, flash_attn=True)
    prompts = [b.encode(t) for t in PROMPTS]
    for params in (GREEDY, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7)):
        batch = b.generate_batch(prompts, params, 12)
        for r, ids in enumerate(prompts):
            alone = params if params.seed is None else SamplingParams(**{**params.to_dict(), "seed": params.seed + r})
            assert [s.token for s in batch[r]] == list(b.stream_tokens(ids, alone, 12))
    b.close()


def test_structured_output_on_llamacpp(store):
    import json

    from slmkit.export.store_export import export_model

    export_model("tiny", "F32", store_as="tiny-f32")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "k": {"enum": ["a", "b", "c"]}},
              "required": ["ok", "k"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    cpp, pt = slmkit.load("tiny-f32", backend="llamacpp"), slmkit.load("tiny")
    msgs = [{"role": "user", "content": "hi"}]
    for seed in range(3):
        data = json.loads(cpp.chat(msgs, max_tokens=30, temperature=1.0, seed=seed, response_format=fmt))
        assert isinstance(data["ok"], bool) and data["k"] in ("a", "b", "c")
    # greedy: the same constrained answer from llama.cpp and from PyTorch on the same weights
    assert cpp.chat(msgs, max_tokens=30, temperature=0, response_format=fmt) == pt.chat(msgs, max_tokens=30, temperature=0, response_format=fmt)


SMOL_STYLE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\\nYou are a helpful assistant named Tiny.<|im_end|>\\n' }}{% endif %}"
              "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _ollama_render(modelfile: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """What Ollama builds from this Modelfile: the SYSTEM default joins .Messages when the request has no system
    message, then Go's own text/template renders the TEMPLATE over them (tests/go/ollama_render.go; .ci/run installs
    Go). Without Go, a template of the form the plain table entries have (a range over .Messages using .Role and
    .Content, then the assistant turn's opening) is rendered by substitution; any other form skips."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    if shutil.which("go"):
        program = Path(__file__).parent / "go" / "ollama_render.go"
        r = subprocess.run(["go", "run", str(program)], input=json.dumps({"template": template, "messages": messages, "tools": tools or []}),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout
    form = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S)
    if not (form and "{{" not in form.group(1).replace("{{ .Role }}", "").replace("{{ .Content }}", "") and "{{" not in form.group(2)):
        pytest.skip("this template needs Go's text/template to render (apt-get install golang-go; .ci/run does this)")
    body, tail = form.groups()
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages) + tail


@pytest.mark.parametrize("with_system", [True, False])
def test_modelfile_renders_what_the_chat_template_renders(with_system):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from slmkit.export.gguf import modelfile_text

    modelfile = modelfile_text("m.gguf", SMOL_STYLE, 0.2, context=2048)
    assert 'SYSTEM """You are a helpful assistant named Tiny."""' in modelfile and "PARAMETER num_ctx 2048" in modelfile
    msgs = ([{"role": "system", "content": "Be terse."}] if with_system else []) + [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    jinja = ImmutableSandboxedEnvironment().from_string(SMOL_STYLE).render(messages=msgs, add_generation_prompt=True)
    assert _ollama_render(modelfile, msgs) == jinja  # the system prompt once, the default one only when none is given


PHI3_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
                 "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
                 "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
                   "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


GEMMA3_TEMPLATE = ("{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
                   "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
                   "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
                   "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
                   "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
                   "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
                   "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
                   "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
                   "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
                   "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
                   "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
                   "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
                   "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
                   "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
                   "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
                   "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
                   "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")


@pytest.mark.parametrize("template,stop", [(PHI3_TEMPLATE, "<|end|>"), (LLAMA3_TEMPLATE, "<|eot_id|>"),
                                           (GEMMA3_TEMPLATE, "<end_of_turn>")], ids=["phi3", "llama3", "gemma3"])
@pytest.mark.parametrize("with_system", [True, False])
def test_modelfile_speaks_each_familys_chat_format(template, stop, with_system):
    """Phi-3's, Llama 3's and Gemma 3's own chat templates (as their tokenizer_config.json ships them): the
    Modelfile's Go template renders what they render (llama.cpp and Ollama add the BOS token themselves; Gemma's
    folds a system message into the first user turn), with their stop tokens."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from slmkit.export.gguf import modelfile_text

    modelfile = modelfile_text("m.gguf", template, 0.2)
    assert f'PARAMETER stop "{stop}"' in modelfile and "SYSTEM" not in modelfile
    msgs = ([{"role": "system", "content": "Be terse."}] if with_system else []) + [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    jinja = ImmutableSandboxedEnvironment().from_string(template).render(messages=msgs, add_generation_prompt=True, bos_token="",
                                                                         eos_token="")
    assert _ollama_render(modelfile, msgs) == jinja


def test_gguf_metadata_carries_the_lineage(store, tmp_path):
    import gguf

    from slmkit.compress.prune_stage import prune_stage
    from slmkit.export.store_export import export_model

    def fields(path):
        r = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in r.fields.items() if k.startswith("general.") or k.startswith("quantize.")}

    res = export_model("tiny", "F32", out_dir=tmp_path / "a")
    f = fields(res["gguf"])
    assert f["general.license"] == "other" and "license is unknown" in res["note"] and f["general.name"].startswith("tiny")
    assert f["general.size_label"] == "29K" and "slmkit" in f["general.tags"] and "general.quantized_by" not in f
    # the root's facts (as a GGUF import records them) reach a child's export, with the stages that made it
    card_path = Store().path("tiny") / "card.json"
    card = json.loads(card_path.read_text())
    card["settings"]["general"] = {"name": "Tiny One", "organization": "TinyOrg", "license": "apache-2.0", "basename": "tiny",
                                   "languages": ["en"], "tags": ["text-generation"]}
    card_path.write_text(json.dumps(card))
    prune_stage("tiny", method="magnitude", sparsity=0.5, name="tiny-sparse", calib=None)
    res = export_model("tiny-sparse", "Q8_0", out_dir=tmp_path / "b")
    f = fields(res["gguf"])
    assert f["general.license"] == "apache-2.0" and f["general.organization"] == "TinyOrg" and f["general.languages"] == ["en"]
    assert f["general.basename"] == "tiny" and f["general.finetune"] == "prune" and f["general.quantized_by"] == "slmkit"
    assert f["general.base_model.count"] == 1 and f["general.base_model.0.name"] == "Tiny One"
    assert f["general.base_model.0.organization"] == "TinyOrg" and {"text-generation", "slmkit", "prune"} <= set(f["general.tags"])
    assert "tiny -> prune (tiny-sparse)" == f["general.description"] and not res["note"]


def test_export_is_quiet_and_reports_fallback_quantization(store, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "slmkit", "export", "tiny", "--type", "Q4_K_M", "--no-ppl", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "llama_model_quantize" not in r.stderr and "llama_model_loader" not in r.stderr  # llama.cpp's log went to a file
    log = (tmp_path / "tiny-q4_k_m.quantize.log").read_text()
    assert "fallback" in log
    note = " ".join(r.stdout.split())
    assert "tensors fell back from Q4_K_M: rows of 32 do not fit 256-wide blocks" in note, r.stdout


def test_export_hf_folder_loads_in_transformers_with_a_model_card(store, tmp_path):
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    r = runner.invoke(app, ["export", "tiny", "--format", "hf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "license is unknown" in r.stdout
    readme = (out / "README.md").read_text()
    header = yaml.safe_load(readme.split("---")[1])
    assert header["license"] == "other" and header["pipeline_tag"] == "text-generation" and "slmkit" in header["tags"]
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    ours = slmkit.load("tiny").backend.model
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["export", "tiny", "--format", "hf", "--out", str(out)])  # not over a folder that holds something
    assert r.exit_code == 1 and "not empty" in r.output and snapshot(tmp_path) == before
    quantize_stage("tiny", "int8")  # an integer child goes as it is stored: compressed-tensors, which transformers reads
    r = runner.invoke(app, ["export", "tiny-int8-rtn", "--format", "hf", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "compressed-tensors" in (tmp_path / "q" / "README.md").read_text().split("---")[1]
    int8 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert int8.config.quantization_config.quantization_config.format == "pack-quantized"
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    quantize_stage("tiny", "int4", method="awq", calib=calib)  # AWQ's smoothing has no standard form: refused
    r = runner.invoke(app, ["export", "tiny-int4-g32-awq", "--format", "hf", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "AWQ" in r.output and not (tmp_path / "a").exists()


def test_export_type_auto_picks_the_smallest_type_within_the_budget(store, tmp_path):
    """Every candidate type is made and measured in llama.cpp; the chosen one is the smallest file whose
    perplexity is within the budget of the F32 file's."""
    import subprocess
    import sys

    import_path(build_tiny_llama(tmp_path / "long", context=1024), "long")  # the sample's 512-token windows fit
    r = subprocess.run([sys.executable, "-m", "slmkit", "export", "long", "--type", "auto", "--ppl-budget", "0.02", "--no-ppl",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "llama_model_quantize" not in r.stderr  # the trials are as quiet as one export
    table = [line.split() for line in r.stdout.splitlines() if line[:1].isupper() and "MB" in line]
    types = [row[0] for row in table]
    assert sorted(types) == sorted(["F32", "Q4_0", "Q4_1", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_M", "Q6_K", "Q8_0"])
    sizes = [float(row[1]) for row in table]
    assert sizes == sorted(sizes)  # smallest first
    chosen = [row for row in table if "<-" in row]
    assert len(chosen) == 1
    increase = {row[0]: float(row[4].rstrip("%")) for row in table}
    smaller = types[:types.index(chosen[0][0])]
    assert increase[chosen[0][0]] <= 2.0 and all(increase[t] > 2.0 for t in smaller)
    assert (tmp_path / "out" / f"long-{chosen[0][0].lower()}.gguf").is_file()
    before = snapshot(tmp_path)
    for extra in (["--ppl-budget", "0"], ["--imatrix", str(tmp_path / "none.txt")]):
        r = runner.invoke(app, ["export", "long", "--type", "auto", "--no-ppl", "--out", str(tmp_path / "bad"), *extra])
        assert r.exit_code == 1 and ("--ppl-budget" in r.output or "--imatrix" in r.output), r.output
    assert snapshot(tmp_path) == before


QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's chat template (tools, calls and results), as its tokenizer_config.json ships it
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" "
    "and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def _json_as_data(text: str) -> str:
    """`text` with every line that is a JSON object replaced by its canonical form: jinja's tojson and Go's json
    write the same data with other spacing and key order."""
    out = []
    for line in text.split("\n"):
        try:
            line = json.dumps(json.loads(line), sort_keys=True) if line.startswith("{") else line
        except ValueError:
            pass
        out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("with_tools", [True, False])
def test_modelfile_speaks_qwen_chatml_with_tools(with_tools):
    """Qwen2.5's template (tools in the system turn, calls in <tool_call> tags, consecutive tool results in one user
    turn): the Modelfile's Go template, given Ollama's .Tools and .ToolCalls, renders what it renders (the JSON as
    data), its default system prompt as SYSTEM; without tools, plain ChatML."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from slmkit.export.gguf import modelfile_text

    modelfile = modelfile_text("m.gguf", QWEN25_TEMPLATE, 0.2)
    assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' in modelfile
    assert '{{ range .Tools }}' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "get_time", "description": "The time in a city.", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"function": {"name": "get_time", "arguments": {"city": "Paris"}}}]
    msgs = [{"role": "user", "content": "Weather and time in Paris?"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "sunny, 21 C"}, {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "Sunny, 21 C, and it is 14:05."}, {"role": "user", "content": "Thanks!"}]
    if not with_tools:
        msgs = [msgs[0], {"role": "assistant", "content": "Sunny."}, msgs[-1]]
    env = ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda x: json.dumps(x)
    jinja = env.from_string(QWEN25_TEMPLATE).render(messages=[{"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}, *msgs],
                                                    tools=tools if with_tools else None, add_generation_prompt=True)
    got = _ollama_render(modelfile, msgs, tools if with_tools else None)
    assert _json_as_data(got) == _json_as_data(jinja)
