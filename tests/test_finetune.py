"""Fine-tuning on a tiny random Llama: LoRA adapters in the store (peft's format, merged at load), merge, full
fine-tuning, export of an adapter, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.errors import SlmkitError
from slmkit.train.finetune import finetune_stage, merge_stage
from slmkit.train.loop import TrainConfig

runner = CliRunner()
QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("What is the capital of Germany?", "Berlin is the capital of Germany."),
      ("What does the quick fox do?", "The quick brown fox jumps over the lazy dog."),
      ("Where do small models run?", "Small language models run on laptops, offline and private.")] * 12


@pytest.fixture
def chats(tmp_path) -> Path:
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                         for q, a in QA))
    return p


CFG = TrainConfig(steps=12, batch_size=4, lr=3e-3, eval_every=6, checkpoint_every=6)


def test_lora_adapter_is_peft_format_loads_merged_and_merges(wide, chats):
    card = finetune_stage(wide, [chats], seq_len=32, config=CFG, name="wide-lora")
    folder = slmkit.Store().path("wide-lora")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(slmkit.Store().path(wide).resolve()) and cfg["r"] == 8
    assert (folder / "adapter_model.safetensors").is_file()
    s = card.settings
    assert card.parent == wide and card.stage == "finetune" and s["base_files"] == slmkit.Store().card(wide).files
    assert s["lora"]["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lins = [m for b in slmkit.load(wide).backend.model.model.layers for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert s["trainable_parameters"] == sum(8 * (m.in_features + m.out_features) for m in lins)  # r (in + out) per layer
    v = s["validation_perplexity"]
    assert v["after"] < v["before"]
    adapted = slmkit.load("wide-lora")  # the base with the adapter merged in
    base = slmkit.load(wide)
    ids = torch.tensor([adapted.backend.encode("What is the capital of France?")])
    with torch.no_grad():
        la, lb = adapted.backend.model(input_ids=ids).logits, base.backend.model(input_ids=ids).logits
    assert not torch.allclose(la, lb, atol=1e-4)  # the adapter changed the model
    merged = merge_stage("wide-lora")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(slmkit.Store().path(merged.name)))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, la, atol=1e-4)
    assert merged.parent == "wide-lora" and merged.settings["base"] == wide
    from peft import AutoPeftModelForCausalLM  # peft finds the base by itself and answers as slmkit's merged model

    with torch.no_grad():
        assert torch.allclose(AutoPeftModelForCausalLM.from_pretrained(str(folder))(input_ids=ids).logits, la, atol=1e-4)


def test_an_adapter_refuses_a_changed_base(wide, chats):
    finetune_stage(wide, [chats], seq_len=32, config=TrainConfig(steps=2, batch_size=4), name="wide-lora")
    store = slmkit.Store()
    card = store.card(wide)
    weights = store.path(wide) / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = state[key] + 1
    save_file(state, str(weights), metadata={"format": "pt"})
    from slmkit.card import build_card, write_card

    write_card(store.path(wide), build_card(store.path(wide), name=wide, stage=card.stage, source=card.source))
    with pytest.raises(SlmkitError, match="not the base the adapter"):
        slmkit.load("wide-lora")


def test_full_finetuning_and_bad_input(wide, chats, tmp_path):
    card = finetune_stage(wide, [chats], method="full", seq_len=32, config=TrainConfig(steps=4, batch_size=4, lr=1e-3), name="wide-ft")
    assert card.stage == "finetune" and card.settings["trainable_share"] == 1.0
    assert not (slmkit.Store().path("wide-ft") / "adapter_config.json").exists()
    for kwargs, message in [
        ({"method": "prefix"}, "unknown method"),
        ({"method": "prompt", "virtual_tokens": 0}, "--virtual-tokens must be"),
        ({"target_modules": ["attn_c"]}, "Target modules: down_proj"),
        ({"r": 0}, "--r must be"),
    ]:
        with pytest.raises(SlmkitError, match=message):
            finetune_stage(wide, [chats], seq_len=32, config=TrainConfig(steps=1), **kwargs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SlmkitError, match=r"bad.jsonl:1: the conversation has no assistant turn"):
        finetune_stage(wide, [bad], seq_len=32)


def test_adapters_export_merged_and_refuse_other_stages(wide, chats, tmp_path):
    from slmkit.compress.prune_stage import prune_stage
    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.sampling import SamplingParams
    from slmkit.export.store_export import export_model

    finetune_stage(wide, [chats], seq_len=32, config=CFG, name="wide-lora")
    res = export_model("wide-lora", "F32", out_dir=tmp_path / "out")
    assert "merged into its base" in res["note"]
    torch_b = slmkit.load("wide-lora").backend
    cpp = LlamaCppBackend(Path(res["gguf"]), threads=2)
    ids = torch_b.encode("What is the capital of France?")
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    assert list(cpp.stream_tokens(ids, greedy, 10)) == list(torch_b.stream_tokens(ids, greedy, 10))
    cpp.close()
    with pytest.raises(SlmkitError, match="slmkit merge wide-lora"):
        prune_stage("wide-lora", method="magnitude", sparsity=0.5)
    with pytest.raises(SlmkitError, match="slmkit merge wide-lora"):
        quantize_stage("wide-lora", "int8")


def test_finetune_and_merge_cli(wide, chats):
    r = runner.invoke(app, ["finetune", wide, "--data", str(chats), "--seq-len", "32", "--steps", "3", "--name", "cli-lora"])
    assert r.exit_code == 0, r.output
    assert "made cli-lora (adapter over wide)" in r.stdout and "trainable parameters" in r.stdout
    r = runner.invoke(app, ["merge", "cli-lora"])
    assert r.exit_code == 0 and "made cli-lora-merged" in r.stdout
    r = runner.invoke(app, ["merge", wide])
    assert r.exit_code == 1 and "not a LoRA adapter" in r.stderr
    r = runner.invoke(app, ["finetune", wide])
    assert r.exit_code == 1 and "no training data" in r.stderr


def test_gradient_checkpointing_default_follows_method_and_memory(monkeypatch):
    from types import SimpleNamespace

    import psutil

    from slmkit.train.finetune import activation_bytes, checkpoint_by_default

    small = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    assert 2.5e9 < activation_bytes(small, 4, 256) < 3.5e9  # the default model at 4 x 256 (measured ~2.4 GB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=20 * 2**30))
    assert checkpoint_by_default("qlora", small, 4, 256)  # QLoRA: always
    assert not checkpoint_by_default("lora", small, 4, 256)  # 3 GB of 20 free: faster without
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * 2**30))
    assert checkpoint_by_default("lora", small, 4, 256) and checkpoint_by_default("full", small, 4, 256)


def test_integer_layers_backpropagate_without_keeping_float_weights():
    from slmkit.compress.quantize import quantize_layer
    from slmkit.layers.integer import Int4Linear, Int8Linear

    torch.manual_seed(0)
    for scheme, group, cls in (("int8", None, Int8Linear), ("int4", 32, Int4Linear)):
        layer = quantize_layer(torch.nn.Linear(64, 96), scheme, group, "rtn", None)
        assert isinstance(layer, cls)
        x = torch.randn(40, 64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = layer(x)
        assert (96, 64) not in saved  # no float copy of the weight waits for backward
        y.square().sum().backward()
        ref = x.detach().clone().requires_grad_(True)
        torch.nn.functional.linear(ref, layer.dequantized(), layer.bias.float() if layer.bias is not None else None).square().sum().backward()
        assert torch.allclose(x.grad, ref.grad, atol=1e-3, rtol=1e-3)


def test_qlora_over_integer_weights(wide, chats):
    from slmkit.compress.quantize_stage import quantize_stage

    lora = finetune_stage(wide, [chats], seq_len=32, config=CFG, name="wide-lora-ref")
    card = finetune_stage(wide, [chats], method="qlora", qlora_scheme="int8", seq_len=32, config=CFG, name="wide-qlora8")
    s = card.settings
    assert s["lora"]["base_quantized"] == "int8 in memory" and s["trainable_parameters"] == lora.settings["trainable_parameters"]
    assert s["validation_perplexity"]["after"] < s["validation_perplexity"]["before"]
    cfg = json.loads((slmkit.Store().path("wide-qlora8") / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).name == wide and "slmkit_quantization" not in json.loads((slmkit.Store().path("wide-qlora8") / "config.json").read_text())
    # over a model that slmkit quantize made: the base stays the integer child; merged into its dequantized weights
    child = quantize_stage(wide, "int4", name="wide-int4").name
    q4 = finetune_stage(child, [chats], method="qlora", seq_len=32, config=CFG, name="wide-int4-qlora")
    assert q4.parent == child and q4.settings["lora"]["base_quantized"] == "int4"
    assert q4.settings["validation_perplexity"]["after"] < q4.settings["validation_perplexity"]["before"]
    adapted, base = slmkit.load("wide-int4-qlora"), slmkit.load(child)
    ids = torch.tensor([base.backend.encode("What is the capital of France?")])
    with torch.no_grad():
        la, lb = adapted.backend.model(input_ids=ids).logits.float(), base.backend.model(input_ids=ids).logits.float()
    assert not torch.allclose(la, lb, atol=1e-3)
    assert merge_stage("wide-int4-qlora").settings["base"] == child
    with pytest.raises(SlmkitError, match="QLoRA base form"):
        finetune_stage(wide, [chats], method="qlora", qlora_scheme="int2", seq_len=32, config=CFG, name="x")


def test_prompt_tuning_is_peft_format_and_runs_as_virtual_tokens(wide, chats, tmp_path):
    from peft import PeftModel

    from slmkit.engine.sampling import SamplingParams
    from slmkit.engine.scheduler import BatchedBackend
    from slmkit.export.store_export import export_model

    card = finetune_stage(wide, [chats], method="prompt", virtual_tokens=5, seq_len=32,
                          config=TrainConfig(steps=12, batch_size=4, lr=3e-2, eval_every=6), name="wide-prompt")
    s, folder = card.settings, slmkit.Store().path("wide-prompt")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5 and Path(cfg["base_model_name_or_path"]).name == wide
    base = slmkit.load(wide).backend
    assert s["trainable_parameters"] == 5 * base.model.config.hidden_size and s["prompt_tuning"]["virtual_tokens"] == 5
    assert s["validation_perplexity"]["after"] < s["validation_perplexity"]["before"]
    # slmkit runs the learned prefix as virtual token ids: the same log-probabilities as peft's own model
    ours = slmkit.load("wide-prompt").backend
    assert ours.prefix == list(range(base.vocab_size, base.vocab_size + 5))
    assert ours.context_length == base.context_length - 5
    peft_model = PeftModel.from_pretrained(base.model, str(folder)).eval()
    ids = ours.encode("What is the capital of France?")
    with torch.no_grad():
        theirs = torch.log_softmax(peft_model(input_ids=torch.tensor([ids])).logits[0, 5:-1].float(), -1)
    assert torch.allclose(ours.logprob_rows(ids), theirs, atol=1e-4)
    assert not torch.allclose(slmkit.load(wide).backend.logprob_rows(ids), theirs, atol=1e-3)  # the prefix matters
    greedy, tokens = SamplingParams(temperature=0, repetition_penalty=1.0), list(ids)
    with torch.no_grad():
        for _ in range(6):  # peft's model, no cache: the reference greedy answer
            tokens.append(int(peft_model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    assert list(ours.stream_tokens(ids, greedy, 6)) == tokens[len(ids):]  # the lean forward with its cache
    batched = BatchedBackend(ours, max_batch=2)
    try:  # the scheduler puts the prefix before every prompt (and caches it with the prompt)
        assert list(batched.stream_tokens(ids, greedy, 6)) == tokens[len(ids):]
        assert list(batched.stream_tokens(ids, greedy, 6)) == tokens[len(ids):]
    finally:
        batched.scheduler.stop()
    for refused in (lambda: merge_stage("wide-prompt"), lambda: export_model("wide-prompt", "F32", out_dir=tmp_path / "o")):
        with pytest.raises(SlmkitError, match="prompt-tuning adapter"):
            refused()


def test_several_adapters_over_one_base_share_the_batch(wide, chats, tmp_path):
    """Two LoRA adapters and their base served at once: one loaded base, one scheduler, rows of different adapters in
    the same steps; each name answers as its merged model does; over a real socket with the openai client."""
    import openai
    from test_serve import Running

    from slmkit.engine.sampling import SamplingParams

    swapped = tmp_path / "swapped.jsonl"  # the other adapter learns other answers
    swapped.write_text("".join(json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": q}]}) + "\n"
                               for q, a in QA))
    cfg = TrainConfig(steps=10, batch_size=4, lr=5e-3)
    finetune_stage(wide, [chats], seq_len=32, config=cfg, name="wide-a", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    finetune_stage(wide, [swapped], seq_len=32, config=cfg, name="wide-b", r=8)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    question = "What is the capital of France?"
    want = {}
    for n in (wide, "wide-a", "wide-b"):  # each alone, merged: 8 greedy tokens (no EOS, so all rows keep running)
        alone = slmkit.load(n, backend="torch").backend
        alone._eos = frozenset()
        prompt = alone.encode(question)
        want[n] = list(alone.stream_tokens(prompt, greedy, 8))
    assert want["wide-a"] != want[wide] and want["wide-b"] != want[wide]
    texts = {n: slmkit.load(n, backend="torch").generate(question, max_tokens=6, temperature=0, repetition_penalty=1.0)
             for n in ("wide-a", "wide-b")}  # the server's defaults: no repetition penalty

    s = Running([wide, "wide-a", "wide-b"])  # no GGUF: all three run on PyTorch
    try:
        reg = s.registry
        assert reg.groups == {n: (wide, ["wide-a", "wide-b"]) for n in (wide, "wide-a", "wide-b")}
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x")
        for n in ("wide-a", "wide-b"):  # over the socket: each name answers as its merged model
            r = client.completions.create(model=n, prompt=question, max_tokens=6, temperature=0)
            assert r.choices[0].text == texts[n], n
        models = {n: reg.model(n) for n in (wide, "wide-a", "wide-b")}
        sched = models[wide].backend.scheduler
        assert all(m.backend.scheduler is sched for m in models.values())  # one base, one batch
        assert len(reg._shared) == 1
        sched.backend._eos = frozenset()
        rows, step = [], sched.store.step
        sched.store.step = lambda last: rows.append(len(last)) or step(last)  # rows per decode step
        streams = {n: m.backend.stream_tokens(prompt, greedy, 8) for n, m in models.items()}
        got = {n: list(st) for n, st in streams.items()}
        assert got == want and max(rows) == 3  # the three names' rows ran in the same steps
    finally:
        s.stop()


def test_eval_responses_before_and_after(wide, chats, tmp_path):
    finetune_stage(wide, [chats], seq_len=32, config=TrainConfig(steps=30, batch_size=4, lr=5e-3), name="wide-lora-eval")
    outs = {}
    for name in (wide, "wide-lora-eval"):
        f = tmp_path / f"{name}.json"
        r = runner.invoke(app, ["eval", name, "--responses", str(chats), "--limit", "4", "--out", str(f)])
        assert r.exit_code == 0, r.output
        outs[name] = json.loads(f.read_text())["results"]["responses"]
    before, after = outs[wide], outs["wide-lora-eval"]
    assert before["n"] == 4 and before["metric"] == "rouge_l" and 0 <= before["rouge_l"] <= 1
    assert after["response_perplexity"] < 0.8 * before["response_perplexity"]  # the responses were learned
    assert after["rouge_l"] >= before["rouge_l"]
    r = runner.invoke(app, ["compare", str(tmp_path / f"{wide}.json"), str(tmp_path / "wide-lora-eval.json"), "--html", str(tmp_path / "c.html")])
    assert r.exit_code == 0 and "responses.rouge_l" in r.output and "responses.ppl" in r.output
    text = tmp_path / "plain.txt"
    text.write_text("just text\n\nno answers here\n")
    r = runner.invoke(app, ["eval", wide, "--responses", str(text)])
    assert r.exit_code == 1 and "no response to compare" in r.output
    r = runner.invoke(app, ["eval", wide, "--responses", str(chats), "--metric", "bleu"])
    assert r.exit_code == 1 and "unknown response metric" in r.output


def test_lora_adapter_as_gguf_beside_its_base(wide, chats, tmp_path):
    from llama_cpp import Llama

    from slmkit.engine.sampling import SamplingParams
    from slmkit.export.store_export import export_model

    finetune_stage(wide, [chats], seq_len=32, config=TrainConfig(steps=20, batch_size=4, lr=5e-3), name="wide-lora-gguf")
    kept = export_model("wide-lora-gguf", "F32", out_dir=tmp_path / "apart", lora_adapter=True)
    merged = export_model("wide-lora-gguf", "F32", out_dir=tmp_path / "merged")
    modelfile = (tmp_path / "apart" / "Modelfile").read_text().splitlines()
    assert modelfile[0] == f"FROM ./{Path(kept['gguf']).name}" and modelfile[1] == "ADAPTER ./wide-lora-gguf-lora.gguf"
    assert kept["adapted_weights"] == 4 * 7  # 4 blocks x q k v o gate up down

    def greedy(model_path, lora=None, n=10):
        llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=64, n_threads=2, verbose=False)
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    torch_b = slmkit.load("wide-lora-gguf").backend
    ids = torch_b.encode("What is the capital of France?")
    want = list(torch_b.stream_tokens(ids, SamplingParams(temperature=0, repetition_penalty=1.0), 10))
    base_only = greedy(kept["gguf"])
    with_adapter = greedy(kept["gguf"], kept["adapter_gguf"])
    assert with_adapter == want == greedy(merged["gguf"])  # base + adapter in llama.cpp = merged = slmkit
    assert base_only != want  # and the adapter is what makes the difference
    with pytest.raises(SlmkitError, match="not a LoRA adapter"):
        export_model(wide, "F32", out_dir=tmp_path / "x", lora_adapter=True)


def test_label_accuracy_picks_the_likeliest_label(wide, tmp_path):
    """--metric accuracy: each answer is the label whose tokens (and the end of the turn) the model finds likeliest
    after the prompt, so always one of the labels; accuracy, macro-F1 and the confusion matrix follow from those
    answers. (That fine-tuning on label rows raises it on the real model: bench/finetune.)"""
    from slmkit.evaluate.metrics import classification_report
    from slmkit.evaluate.responses import response_items
    from slmkit.model import encode_chat

    rows = [("The quick brown fox jumps", "animal"), ("Paris is the capital of France", "place"),
            ("def add(a, b): return a + b", "code"), ("Berlin is the capital of Germany", "place")]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows))
    labels = ["animal", "place", "code", "other"]
    model = slmkit.load(wide)
    b = model.backend
    expected = []
    for prompt, _ in response_items(data):
        ids = encode_chat(b, prompt)
        by_hand = {lab: sum(b.score_batch([(ids + b.encode(lab, add_special_tokens=False) + sorted(b.eos_token_ids)[:1], len(ids))])[0])
                   for lab in labels}
        got = model.classify(prompt, labels)
        assert got.label == max(by_hand, key=by_hand.get) and got.scores == pytest.approx(by_hand, abs=1e-4)
        assert sum(got.probabilities.values()) == pytest.approx(1.0) and max(got.probabilities, key=got.probabilities.get) == got.label
        expected.append(got.label)
    f = tmp_path / "acc.json"
    r = runner.invoke(app, ["eval", wide, "--responses", str(data), "--metric", "accuracy", "--labels", ",".join(labels), "--out", str(f)])
    assert r.exit_code == 0 and "responses.accuracy" in r.output and "responses.macro_f1" in r.output, r.output
    res = json.loads(f.read_text())["results"]["responses"]
    report = classification_report(expected, [a for _, a in rows], labels)
    assert res["labels"] == labels and res["n"] == 4
    assert (res["accuracy"], res["macro_f1"], res["confusion"]) == (report["accuracy"], report["macro_f1"], report["confusion"])
    r = runner.invoke(app, ["compare", str(f), "--html", str(tmp_path / "c.html")])
    page = (tmp_path / "c.html").read_text()
    assert r.exit_code == 0 and "<h2>Labels</h2>" in page and f'alt="{wide} confusion matrix" src="data:image/png;base64,' in page
    r = runner.invoke(app, ["eval", wide, "--responses", str(data), "--metric", "accuracy", "--labels", "animal,place"])
    assert r.exit_code == 1 and "references outside the label set: code" in r.output
