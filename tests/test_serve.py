"""The HTTP server over real sockets on 127.0.0.1, with the official openai client and raw HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from conftest import snapshot

from slmkit import load as slmkit_load
from slmkit.engine.sampling import SamplingParams
from slmkit.serve.app import create_app
from slmkit.serve.metrics import Metrics
from slmkit.serve.registry import ModelRegistry


GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Poll until condition() is true or the timeout passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, names: list[str], **kw) -> None:
        import uvicorn

        self.metrics = Metrics()
        reg_kw = {k: kw.pop(k) for k in ("max_batch", "max_queue", "prefix_cache_tokens", "splits", "cache", "cache_sampled",
                                          "small_only", "decision_log", "large_key", "escalation_log") if k in kw}
        self.registry = ModelRegistry(names, self.metrics, **{"max_batch": 4, "max_queue": 16, "prefix_cache_tokens": 4096, **reg_kw})
        app = create_app(self.registry, self.metrics, **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def srv(store):
    s = Running(["tiny", "smollm2-135m-instruct"], max_tokens_limit=40)
    yield s
    s.stop()


def client(srv, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def test_openai_client_chat_completions_models_embeddings(srv):
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny", "smollm2-135m-instruct"]
    msgs = [{"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=3, temperature=1.0)
    again = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=3, temperature=1.0)
    assert r.choices[0].message.content == again.choices[0].message.content  # same seed, same answer
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=3, temperature=1.0, stream=True)]
    assert "".join(pieces) == r.choices[0].message.content
    two = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, n=2, seed=1)
    assert [ch.index for ch in two.choices] == [0, 1]
    comp = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    chat_lp = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat_lp.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= t.top_logprobs[0].logprob + 1e-5 for t in content)
    emb = c.embeddings.create(model="tiny", input=["hello", "world"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 32
    assert abs(sum(v * v for v in emb.data[0].embedding) - 1) < 1e-4


def test_stop_and_max_tokens_and_greedy_matches_the_library(srv, store):
    import slmkit

    lib = slmkit.load("tiny").chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=10, repetition_penalty=1.0)
    r = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0)
    assert r.choices[0].message.content == lib
    if len(lib) > 4:
        stop = lib[2:4]
        cut = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == lib[: lib.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_health_metrics_and_page(srv):
    client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and "tiny" in h["loaded"]
    m = httpx.get(srv.url + "/metrics").text
    for name in ("slmkit_requests_total", "slmkit_prompt_tokens_total", "slmkit_completion_tokens_total",
                 "slmkit_time_to_first_token_seconds_bucket", "slmkit_inter_token_latency_seconds", "slmkit_queue_depth",
                 "slmkit_running_batch_size", "slmkit_prefix_cache_hit_rate"):
        assert name in m, name
    assert 'slmkit_requests_total{endpoint="chat",model="tiny",status="200"} 1.0' in m
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "<title>slmkit chat</title>" in page.text


def test_bad_requests_get_openai_errors(srv):
    post = lambda body, path="/v1/chat/completions": httpx.post(srv.url + path, json=body, timeout=30)
    r = post({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"] and r.json()["error"]["code"] == "model_not_found"
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "fox " * 200}]})
    assert r.status_code == 400 and "context window is 64 tokens" in r.json()["error"]["message"]
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 41})
    assert r.status_code == 400 and "limit of 40" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    r = post({"model": "tiny", "messages": "hi"})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})
    assert r.status_code == 422
    r = post({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True})
    assert r.status_code == 400
    assert httpx.get(srv.url + "/health").status_code == 200  # still alive


def test_api_key(store):
    s = Running(["tiny"], api_key="sekret")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client(s, "sekret").models.list().data[0].id == "tiny"
        assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/").status_code == 200
        assert httpx.post(s.url + "/tokenize", json={"content": "hi"}).status_code == 401
        assert httpx.post(s.url + "/detokenize", json={"tokens": [1]}).status_code == 401
    finally:
        s.stop()


def test_ollama_tags_report_the_weights_that_run(store, tmp_path):
    """/api/tags and /api/show describe what the engine runs: a GGUF's quantization type and that file's size on
    llama.cpp, a float model's safetensors on PyTorch."""
    from slmkit.export.store_export import export_model

    export_model("tiny", "Q8_0", out_dir=tmp_path / "q8", store_as="tiny-q8")
    s = Running(["tiny", "tiny-q8"], max_tokens_limit=8)
    try:
        tags = {m["name"]: m for m in httpx.get(s.url + "/api/tags").json()["models"]}
        q8 = tags["tiny-q8:latest"]
        assert s.registry.backends["tiny-q8"] == "llamacpp"
        assert (q8["details"]["format"], q8["details"]["quantization_level"], q8["size"]) == ("gguf", "Q8_0", store.card("tiny-q8").weights_bytes["gguf"])
        t = tags["tiny:latest"]
        assert (t["details"]["format"], t["details"]["quantization_level"], t["size"]) == ("safetensors", "FLOAT32", store.card("tiny").weights_bytes["safetensors"])
        assert httpx.post(s.url + "/api/show", json={"model": "tiny-q8"}).json()["details"]["quantization_level"] == "Q8_0"
    finally:
        s.stop()


def test_token_ids_tokenize_and_detokenize(store):
    """llama-server's /tokenize and /detokenize; token-id prompts in /v1/completions (one list or several) answer as
    the same text does; ids outside the vocabulary are refused."""
    s = Running(["tiny"], max_tokens_limit=20)
    try:
        c = client(s)
        ids = httpx.post(s.url + "/tokenize", json={"content": "Once upon a time"}).json()["tokens"]
        b = slmkit_load("tiny").backend
        assert ids == b.encode("Once upon a time", add_special_tokens=False)
        pieces = httpx.post(s.url + "/tokenize", json={"content": "Once upon", "with_pieces": True}).json()["tokens"]
        assert "".join(p["piece"] for p in pieces) == "Once upon" and [p["id"] for p in pieces] == b.encode("Once upon", add_special_tokens=False)
        assert httpx.post(s.url + "/detokenize", json={"tokens": ids}).json() == {"content": "Once upon a time"}
        full = b.encode("Once upon a time", add_special_tokens=True)
        by_text = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0).choices[0].text
        assert c.completions.create(model="tiny", prompt=full, max_tokens=6, temperature=0).choices[0].text == by_text
        two = c.completions.create(model="tiny", prompt=[full, full[:2]], max_tokens=6, temperature=0)
        assert len(two.choices) == 2 and two.choices[0].text == by_text
        for bad in ({"prompt": [10 ** 6]}, {"prompt": [[1, -1]]}):
            r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "max_tokens": 4, **bad})
            assert r.status_code == 400 and "outside" in r.json()["error"]["message"], r.text
        by_ids = c.embeddings.create(model="tiny", input=[full, ids]).data  # embeddings of token ids, as of the text
        assert by_ids[0].embedding == pytest.approx(c.embeddings.create(model="tiny", input="Once upon a time").data[0].embedding, abs=1e-5)
        r = httpx.post(s.url + "/v1/embeddings", json={"model": "tiny", "input": [1, 10 ** 6]})
        assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/detokenize", json={"tokens": [10 ** 6]})
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
        assert httpx.post(s.url + "/tokenize", json={"model": "nope", "content": "x"}).status_code == 404
    finally:
        s.stop()


def _stream_lines(url: str, body: dict):
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        yield r
        for line in r.iter_lines():
            yield line


def test_queue_full_is_429_and_disconnect_frees_the_slot(store):
    s = Running(["tiny"], max_batch=1, max_queue=1, max_tokens_limit=100000)
    try:
        sched = s.registry.get("tiny").backend.scheduler
        # a stream that never ends by itself: no context limit, no end-of-sequence token
        sched.backend.model.config.max_position_embeddings = 100000
        sched.backend._eos = frozenset()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 100000, "temperature": 1.0, "seed": 0}
        first = _stream_lines(s.url, body)
        assert next(first).status_code == 200
        next(first)
        waiting = threading.Thread(target=lambda: httpx.post(s.url + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=5), timeout=60))
        waiting.start()
        wait_until(lambda: sched.queue_depth == 1, 2.0)
        r = httpx.post(s.url + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=5), timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        first.close()  # the streaming client goes away: its slot must come free, and the waiting request run
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        assert wait_until(lambda: sched.batch_size == 0)
    finally:
        s.stop()


def test_graceful_shutdown_finishes_running_requests(store):
    s = Running(["tiny"], max_tokens_limit=60)
    result = {}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 1.0, "seed": 0}
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)))
    t.start()
    time.sleep(0.3)
    s.stop()
    t.join(timeout=30)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"] is not None


def test_serve_cli_refuses_unknown_models(store):
    from typer.testing import CliRunner

    from slmkit.cli import app

    r = CliRunner().invoke(app, ["serve", "nosuch"])
    assert r.exit_code == 1 and "no model named 'nosuch'" in r.stderr


def test_gguf_only_model_is_served_batched_on_llamacpp(store):
    """A model with a GGUF (here an export installed with --name) is served on llama.cpp, continuously batched."""
    from typer.testing import CliRunner

    from slmkit.cli import app
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.store import Store

    r = CliRunner().invoke(app, ["export", "tiny", "--type", "F32", "--name", "tiny-f32", "--no-ppl"])
    assert r.exit_code == 0, r.output
    s = Running(["tiny-f32", "tiny"], max_tokens_limit=40)
    try:
        assert s.registry.backends == {"tiny-f32": "llamacpp", "tiny": "torch"}
        c = client(s)
        msgs = [{"role": "user", "content": "hi"}]
        ref = LlamaCppBackend(next(Store().path("tiny-f32").glob("*.gguf")), threads=2, flash_attn=True)
        try:
            want = ref.decode([t for t in ref.stream_tokens(ref.encode(ref.render_chat(msgs), add_special_tokens=False),
                                                          GREEDY, 8) if t not in ref.eos_token_ids])
        finally:
            ref.close()
        got = c.chat.completions.create(model="tiny-f32", messages=msgs, max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want
        results: dict[int, str] = {}

        def one(i: int) -> None:  # four streams at once share the batch
            pieces = c.chat.completions.create(model="tiny-f32", messages=[{"role": "user", "content": f"hi {i}"}],
                                               max_tokens=12, seed=i, temperature=1.0, stream=True)
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in pieces)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [0, 1, 2, 3]
        metrics = httpx.get(s.url + "/metrics").text
        assert 'slmkit_requests_total{endpoint="chat",model="tiny-f32",status="200"} 5.0' in metrics
        # pooled embeddings agree with PyTorch's on the same weights
        a = c.embeddings.create(model="tiny-f32", input="hello world").data[0].embedding
        b = c.embeddings.create(model="tiny", input="hello world").data[0].embedding
        assert sum(x * y for x, y in zip(a, b)) > 0.999
        too_long = httpx.post(s.url + "/v1/completions", json={"model": "tiny-f32", "prompt": "fox " * 200}, timeout=30)
        assert too_long.status_code == 400 and "context window is 64 tokens" in too_long.json()["error"]["message"]
    finally:
        s.stop()


def test_serve_backend_choice_errors(store):
    from typer.testing import CliRunner

    from slmkit.cli import app

    before = snapshot(store.root)
    r = CliRunner().invoke(app, ["serve", "tiny", "--backend", "llamacpp"])
    assert r.exit_code == 1 and "has no GGUF file" in r.stderr and "slmkit export tiny" in r.stderr
    r = CliRunner().invoke(app, ["serve", "tiny", "--backend", "onnx"])
    assert r.exit_code == 1 and "unknown backend 'onnx'" in r.stderr and "auto, torch, llamacpp" in r.stderr
    assert snapshot(store.root) == before


def test_openai_api_details_content_parts_usage_chunk_models_cors_and_refusals(store):
    s = Running(["tiny"], cors_origins=["http://localhost:3000"])
    try:
        c = client(s)
        plain = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}],
                                          max_tokens=6, temperature=0)
        parts = c.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
            {"role": "developer", "content": "Be brief."},  # OpenAI's newer name for system
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}])
        assert parts.choices[0].message.content == plain.choices[0].message.content
        assert parts.created > 1_700_000_000
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens > 0
        assert all(ch.usage is None for ch in chunks[:-1])
        m = c.models.retrieve("tiny")
        assert m.id == "tiny" and m.created > 1_700_000_000
        with pytest.raises(Exception) as e:
            c.models.retrieve("nope")
        assert getattr(e.value, "status_code", None) == 404
        # top_k and repetition_penalty are taken; sampling with top_k 1 is greedy
        top1 = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 6, "temperature": 1.5, "top_k": 1, "seed": 1}).json()
        greedy = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 6, "temperature": 0}).json()
        assert top1["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
        minp = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 6, "temperature": 1.5, "min_p": 1.0, "seed": 2}).json()
        assert minp["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]  # min_p 1: the top token only
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3})
        assert bad.status_code == 422
        refused = [
            {"logit_bias": {"1": 5}},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
            {"functions": [{"name": "f", "parameters": {}}]},  # the legacy form of tools
        ]
        for extra in refused:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
            r = httpx.post(s.url + "/v1/chat/completions", json=body)
            msg = r.json()["error"]["message"]
            assert r.status_code == 400 and ("not supported" in msg or "text only" in msg), (extra, r.text)
        ok = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 4, "response_format": {"type": "text"}, "tool_choice": "none"})
        assert ok.status_code == 200
        pre = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        s.stop()


def test_ollama_native_api_with_the_official_client(store):
    import ollama

    s = Running(["tiny"], max_tokens_limit=40)
    try:
        c = ollama.Client(host=s.url)
        names = [m.model for m in c.list().models]
        assert names == ["tiny:latest"]
        msgs = [{"role": "user", "content": "hi"}]
        opts = {"temperature": 0, "num_predict": 6}
        whole = c.chat(model="tiny:latest", messages=msgs, options=opts, stream=False)
        want = client(s).chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0).choices[0].message.content
        assert whole.message.content == want and whole.done and whole.eval_count == 6 and whole.prompt_eval_count > 0
        parts = list(c.chat(model="tiny", messages=msgs, options=opts, stream=True))
        assert "".join(p.message.content for p in parts) == want and parts[-1].done and not parts[0].done
        gen = c.generate(model="tiny", prompt="hi", options=opts)
        assert gen.response == want  # not raw: the prompt goes through the chat template as a user message
        raw = c.generate(model="tiny", prompt="Once upon", raw=True, options=opts)
        assert raw.response == client(s).completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0).choices[0].text
        emb = c.embed(model="tiny", input=["a", "bb"])
        assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 32
        assert c.embeddings(model="tiny", prompt="bb").embedding == pytest.approx(emb.embeddings[1], abs=1e-5)  # the older route
        shown = c.show("tiny")
        assert shown.details.family == "llama" and shown.capabilities == ["completion", "tools"]  # it has a chat template
        assert [m.model for m in c.ps().models] == ["tiny:latest"]
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model="nope", messages=msgs)
        assert e.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model="tiny", messages=msgs, options={"mirostat": 2})
        assert e.value.status_code == 400 and "mirostat" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model="tiny", messages=msgs, options={"num_predict": 400})
        assert e.value.status_code == 400 and "limit" in e.value.error
        # Ollama's unload and preload calls: an empty prompt (or no messages) answers at once, without generating
        gone = c.generate(model="tiny", prompt="", keep_alive=0)
        assert gone.done and gone.done_reason == "unload" and gone.response == "" and c.ps().models == []
        back = c.generate(model="tiny", prompt="")
        assert back.done_reason == "load" and [m.model for m in c.ps().models] == ["tiny:latest"]
        assert c.chat(model="tiny", messages=[], keep_alive="0s").done_reason == "unload" and c.ps().models == []
        assert c.chat(model="tiny", messages=msgs, options=opts, stream=False).message.content == want  # loaded again
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="nope", prompt="", keep_alive=0)
        assert e.value.status_code == 404
        # a timed keep_alive: loaded until then (ps says when), freed once idle after it
        t0 = time.time()
        c.chat(model="tiny", messages=msgs, options=opts, keep_alive="1500ms")
        until = c.ps().models[0].expires_at.timestamp()
        assert t0 + 1 < until < time.time() + 2
        assert wait_until(lambda: c.ps().models == [], timeout=6)
        c.embed(model="tiny", input="a", keep_alive=-1)  # loaded for good again
        assert c.ps().models[0].expires_at.year == 9999
        with pytest.raises(ollama.ResponseError) as e:
            c.generate(model="tiny", prompt="hi", keep_alive="soon")
        assert e.value.status_code == 400 and "not a duration" in e.value.error
    finally:
        s.stop()


def test_structured_output_by_json_schema_in_both_apis(store):
    import ollama

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"], "additionalProperties": False}
    s = Running(["tiny"], max_tokens_limit=40)
    try:
        c = client(s)
        for seed in range(3):  # sampled, and still valid
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30, temperature=1.0, seed=seed,
                                          response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
            data = json.loads(r.choices[0].message.content)
            assert data["answer"] in ("yes", "no") and 0 <= data["n"] <= 9 and set(data) == {"answer", "n"}
            assert r.choices[0].finish_reason == "stop"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30, temperature=0, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}) if ch.choices)
        assert json.loads(streamed)["answer"] in ("yes", "no")
        o = ollama.Client(host=s.url).chat(model="tiny", messages=[{"role": "user", "content": "hi"}], format=schema,
                                           options={"temperature": 0, "num_predict": 30})
        assert json.loads(o.message.content)["answer"] in ("yes", "no")
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                               "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
        assert bad.status_code == 400 and "schema" in bad.json()["error"]["message"]
        odd = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": odd})
        assert bad.status_code == 400, bad.text
        assert httpx.get(s.url + "/health").status_code == 200  # and the server keeps serving
    finally:
        s.stop()


def test_tool_calling_with_the_official_client(store, tmp_path):
    from conftest import build_tiny_llama
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path / "long", context=2048), "tinylong")  # the tool descriptions need room
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                              "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
    s = Running(["tinylong"], max_tokens_limit=80)
    try:
        c = client(s)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model="tinylong", messages=msgs, tools=[weather, clock], tool_choice="required", max_tokens=70, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        assert (args in ({"city": "Paris"}, {"city": "Rome"})) if call.function.name == "get_weather" else args == {}
        named = c.chat.completions.create(model="tinylong", messages=msgs, tools=[weather, clock], max_tokens=70, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
        # streamed: the call arrives as one tool_calls delta, then finish_reason tool_calls
        chunks = list(c.chat.completions.create(model="tinylong", messages=msgs, tools=[weather], tool_choice="required", max_tokens=70,
                                                temperature=0, stream=True))
        deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
        assert len(deltas) == 1 and deltas[0][0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
        # the conversation goes on with the call and its result
        follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        again = c.chat.completions.create(model="tinylong", messages=follow, tools=[weather], tool_choice="none", max_tokens=8, temperature=0)
        assert again.choices[0].message.content is not None and again.choices[0].finish_reason in ("stop", "length")
        # after a tool's result, auto answers in text: even a call-shaped answer (forced here by a schema) is not a call
        shape = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": weather["function"]["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False}
        after = c.chat.completions.create(model="tinylong", messages=follow, tools=[weather], max_tokens=60, temperature=0,
                                          response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": shape}})
        assert after.choices[0].message.tool_calls is None and json.loads(after.choices[0].message.content)["name"] == "get_weather"
        again = c.chat.completions.create(model="tinylong", messages=follow, tools=[weather], tool_choice="required", max_tokens=60, temperature=0)
        assert again.choices[0].message.tool_calls[0].function.name == "get_weather"  # unless a call is asked for
        auto = c.chat.completions.create(model="tinylong", messages=msgs, tools=[weather], max_tokens=8, temperature=0)
        assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")  # a tiny random model answers in text
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "tinylong", "messages": msgs, "tools": [{"type": "function"}]})
        assert bad.status_code == 400 and "function tool" in bad.json()["error"]["message"]
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "tinylong", "messages": msgs, "tools": [weather],
                                                               "tool_choice": {"type": "function", "function": {"name": "nope"}}})
        assert bad.status_code == 400 and "not among the tools" in bad.json()["error"]["message"]
    finally:
        s.stop()


def test_ollama_chat_with_tools(store, tmp_path):
    """/api/chat with tools, through the official ollama client: an answer that is a call comes back as Ollama's
    tool_calls (arguments as an object; here the answer is held to a call's shape by `format`, since Ollama has no
    tool_choice), streamed too; the call and its result go back into the conversation; bad tools are a 400."""
    import ollama

    from conftest import build_tiny_llama
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path / "long", context=2048), "tinylong")
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}
    shape = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": weather["function"]["parameters"]},
             "required": ["name", "arguments"], "additionalProperties": False}
    s = Running(["tinylong"], max_tokens_limit=60)
    try:
        c = ollama.Client(host=s.url)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat(model="tinylong", messages=msgs, tools=[weather], format=shape, options={"temperature": 0, "num_predict": 50})
        call = r.message.tool_calls[0]
        assert r.done and call.function.name == "get_weather" and dict(call.function.arguments) in ({"city": "Paris"}, {"city": "Rome"})
        parts = list(c.chat(model="tinylong", messages=msgs, tools=[weather], format=shape, stream=True,
                            options={"temperature": 0, "num_predict": 50}))
        assert parts[0].message.tool_calls[0].function.name == "get_weather" and parts[-1].done
        follow = msgs + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                         {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]
        text = c.chat(model="tinylong", messages=follow, tools=[weather], options={"temperature": 0, "num_predict": 6})
        plain = c.chat(model="tinylong", messages=msgs, options={"temperature": 0, "num_predict": 6})
        assert text.done and text.prompt_eval_count > plain.prompt_eval_count  # the call and its result were read
        assert text.message.tool_calls is None  # after a result the model answers in text (auto becomes none)
        from slmkit.serve import ollama_compat as ol

        seen = ol.chat_messages(ol.ChatRequest(model="tinylong", messages=follow))
        assert seen[1:] == [{"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                            {"role": "user", "content": "Result of get_weather: sunny, 21 C"}]
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(model="tinylong", messages=msgs, tools=[{"type": "function"}])
        assert e.value.status_code == 400 and "function tool" in e.value.error
    finally:
        s.stop()


def test_ps_lists_what_a_running_server_loaded(store):
    from typer.testing import CliRunner

    from slmkit.cli import app

    s = Running(["tiny", "smollm2-135m-instruct"])
    try:
        runner = CliRunner()
        r = runner.invoke(app, ["ps", "--url", s.url, "--json"])
        assert r.exit_code == 0 and json.loads(r.stdout)["loaded"] == []
        client(s).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        r = runner.invoke(app, ["ps", "--url", s.url])
        assert r.exit_code == 0 and "1 of 2 offered models loaded" in " ".join(r.stdout.split()) and "│ tiny" in r.stdout
    finally:
        s.stop()


def test_responses_api_with_the_official_client(store, tmp_path):
    """/v1/responses through openai's client: text (the same answer chat completions gives), instructions, streamed
    events (deltas that add up to the text), previous_response_id, retrieval, function tools with their outputs,
    json_schema output, max_output_tokens (incomplete), and errors."""
    from conftest import build_tiny_llama
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path / "long", context=2048), "tinylong")
    s = Running(["tinylong"], max_tokens_limit=60)
    try:
        c = client(s)
        chat = c.chat.completions.create(model="tinylong", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                         max_tokens=8, temperature=0).choices[0].message.content
        r = c.responses.create(model="tinylong", input="hi", instructions="Be brief.", max_output_tokens=8, temperature=0)
        assert r.object == "response" and r.output_text == chat and r.usage.output_tokens <= 8 and r.usage.input_tokens > 0
        assert r.status in ("completed", "incomplete") and r.instructions == "Be brief."
        events = list(c.responses.create(model="tinylong", input="hi", instructions="Be brief.", max_output_tokens=8,
                                         temperature=0, stream=True))
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed", "response.incomplete")
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == chat == events[-1].response.output_text
        assert [e.sequence_number for e in events] == list(range(len(events)))
        nxt = c.responses.create(model="tinylong", input="and then?", previous_response_id=r.id, max_output_tokens=4, temperature=0)
        assert nxt.previous_response_id == r.id and nxt.usage.input_tokens > r.usage.input_tokens  # the earlier turns came along
        assert c.responses.retrieve(r.id).output_text == r.output_text
        weather = {"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": {
            "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}
        called = c.responses.create(model="tinylong", input="Weather in Paris?", tools=[weather], tool_choice="required",
                                    max_output_tokens=50, temperature=0)
        call = called.output[0]
        assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
        answered = c.responses.create(model="tinylong", previous_response_id=called.id, tools=[weather], max_output_tokens=6, temperature=0,
                                      input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
        fresh = c.responses.create(model="tinylong", input="Weather in Paris?", max_output_tokens=6, temperature=0)
        assert answered.output[0].type == "message" and answered.usage.input_tokens > fresh.usage.input_tokens  # the call and result came along
        streamed_call = [e for e in c.responses.create(model="tinylong", input="Weather?", tools=[weather], tool_choice="required",
                                                       max_output_tokens=50, temperature=0, stream=True)]
        assert streamed_call[-1].response.output[0].name == "get_weather"
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
        structured = c.responses.create(model="tinylong", input="ok?", max_output_tokens=20, temperature=1.0,
                                        text={"format": {"type": "json_schema", "name": "x", "schema": schema}})
        assert isinstance(json.loads(structured.output_text)["ok"], bool)
        short = c.responses.create(model="tinylong", input="Once upon a time", max_output_tokens=1, temperature=0)
        assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
        r = httpx.post(s.url + "/v1/responses", json={"model": "tinylong", "input": "x", "previous_response_id": "resp_nope"})
        assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/responses", json={"model": "tinylong", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]})
        assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/responses", json={"model": "tinylong", "input": "x", "tools": [{"type": "web_search"}]})
        assert r.status_code == 400 and "web_search" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/v1/responses/resp_nope").status_code == 404
        assert httpx.post(s.url + "/v1/responses", json={"model": "nope", "input": "x"}).status_code == 404
    finally:
        s.stop()


class FakeServable:
    """A served name with canned answers and no weights (model.Servable): what the server needs of a model is only
    the protocol; `single` None says another model may answer (as a router's)."""

    def __init__(self, name: str, text: str) -> None:
        self.name, self.text, self.single, self.seen = name, text, None, []

    @property
    def backend(self):
        raise AssertionError("the server asked a routed name's backend for something only one model has")

    def stream_chat(self, messages, **sampling):
        from slmkit.serve.hybrid import CachedGeneration

        self.seen.append((messages, sampling))
        return CachedGeneration(self.text, self.count_chat(messages), 2, "stop")

    def stream(self, prompt, **sampling):
        return self.stream_chat([{"role": "user", "content": prompt}], **sampling)

    def count_tokens(self, text):
        return len(text.split())

    def count_chat(self, messages):
        return sum(self.count_tokens(m["content"]) for m in messages)


def test_the_server_needs_only_the_servable_protocol(store):
    s = Running(["tiny"], max_tokens_limit=8)
    fake = FakeServable("tiny", "canned answer")
    s.registry._served["tiny"] = fake  # what registry.get hands the routes for this name
    try:
        c = client(s)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}], max_tokens=5)
        assert r.choices[0].message.content == "canned answer" and r.usage.prompt_tokens == 2 and fake.seen[-1][1]["max_tokens"] == 5
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True) if ch.choices)
        assert streamed == "canned answer"
        assert c.completions.create(model="tiny", prompt="once upon", max_tokens=3).choices[0].text == "canned answer"
        for call, why in [(lambda: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True), "routed"),
                          (lambda: c.completions.create(model="tiny", prompt=[[1, 2]]), "routed"),
                          (lambda: httpx.post(s.url + "/tokenize", json={"model": "tiny", "content": "x"}).raise_for_status(), "400")]:
            with pytest.raises(Exception, match=why):
                call()
    finally:
        s.stop()


def test_a_served_model_stays_out_of_the_collectors_walks_and_is_freed_whole_on_unload(store):
    """Once a served model is open its objects are frozen (gc.freeze: no full collection walks them inside a burst of
    requests); unloading it thaws, so its weights really go, and freezes what is left."""
    import gc
    import weakref

    registry = ModelRegistry(["tiny"], Metrics(), max_batch=2, max_queue=4, prefix_cache_tokens=0, backend="torch")
    gc.unfreeze()
    model = registry.get("tiny")
    assert isinstance(model.generate("hello", max_tokens=2, temperature=0), str)  # opened on its scheduler's thread
    assert gc.get_freeze_count() > 0
    weights = weakref.ref(model.backend.scheduler.backend.model)
    del model
    assert registry.unload("tiny")
    gc.collect()
    assert weights() is None and gc.get_freeze_count() > 0
