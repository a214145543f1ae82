"""Hardening, round 3 (issue 28): one broken file never breaks the store; one client never harms another's stream."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from test_hardening import MSG, srv  # noqa: F401  (srv: a fixture, a server of the tiny model, max_tokens 40)
from test_serve import Running
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.errors import BrokenModel
from slmkit.store import Store

runner = CliRunner()


def test_a_broken_card_is_listed_as_broken_and_hides_nothing(store):
    (store.path("tiny") / "card.json").write_text('{"name":')
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0, r.output
    assert "BROKEN" in r.stdout and "smollm2-135m-instruct" in r.stdout  # the others are still listed
    assert "not valid JSON" in r.stderr and "slmkit models rm tiny" in r.stderr
    listed = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert {"name": "tiny", "broken": listed[-1]["broken"]} == listed[-1] and len(listed) == 2
    for cmd in (["models", "show", "tiny"], ["run", "tiny", "hi"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1 and "cannot be read: not valid JSON" in r.stderr and "Traceback" not in r.output, r.output
    (store.path("tiny") / "card.json").write_text("[1, 2]")
    assert "not a JSON object" in Store().scan()[1]["tiny"]
    r = runner.invoke(app, ["models", "rm", "tiny"])  # and it can be removed
    assert r.exit_code == 0 and "tiny" not in Store().names()


def test_truncated_weights_are_named_on_every_load_and_by_verify(store):
    weights = store.path("tiny") / "model.safetensors"
    whole = weights.stat().st_size
    r = runner.invoke(app, ["models", "verify", "tiny"])
    assert r.exit_code == 0 and "tiny: ok" in r.stdout
    os.truncate(weights, whole // 2)
    r = runner.invoke(app, ["models", "show", "tiny"])
    assert r.exit_code == 1 and "damaged: model.safetensors" in r.stderr and "truncated" in r.stderr
    for backend in ("torch", "auto"):
        with pytest.raises(BrokenModel, match=r"model tiny is damaged: model.safetensors: it has .* bytes where its header says .* \(truncated\)"):
            slmkit.load("tiny", backend=backend)
    r = runner.invoke(app, ["run", "tiny", "--backend", "torch", "hi"])
    assert r.exit_code == 1 and "is damaged" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["models", "verify", "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["tiny"]["model.safetensors"] == "changed" and report["smollm2-135m-instruct"]["model.safetensors"] == "ok"
    # a stage reading the float weights names the file too
    r = runner.invoke(app, ["quantize", "tiny", "--scheme", "int8", "--no-ppl"])
    assert r.exit_code == 1 and "damaged" in r.stderr and "Traceback" not in r.output, r.output
    weights.unlink()
    r = runner.invoke(app, ["models", "verify", "tiny"])
    assert r.exit_code == 1 and "model.safetensors: missing" in r.stdout


def test_a_truncated_gguf_in_the_store_is_named(store, tmp_path):
    from slmkit.export.gguf import export_gguf

    folder = store.path("tiny")
    gguf = export_gguf(folder, tmp_path, name="t", gguf_type="Q8_0")
    from slmkit.sources.importer import import_path

    import_path(gguf, "tq8")
    stored = next(Store().path("tq8").glob("*.gguf"))
    os.truncate(stored, stored.stat().st_size - 100)
    with pytest.raises(BrokenModel, match="tq8 is damaged: .*gguf: it is truncated"):
        slmkit.load("tq8", backend="llamacpp")


# --- the server -----------------------------------------------------------------------------------------------


def test_extreme_sampling_values_never_end_other_streams(srv):
    """D1: temperature / repetition penalty 1e-300 (OpenAI and Ollama) beside a live greedy stream."""
    control = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "temperature": 0,
                                                                  "max_tokens": 30}, timeout=60).json()
    import threading

    live: dict = {}

    def stream() -> None:
        live["r"] = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "temperature": 0,
                                                                         "max_tokens": 30}, timeout=60).json()

    t = threading.Thread(target=stream)
    t.start()
    tiny_t = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "temperature": 1e-300, "max_tokens": 5}, timeout=60)
    assert tiny_t.status_code == 200  # samples greedily
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "repetition_penalty": 1e-300}, timeout=60)
    assert r.status_code == 400 and "repetition_penalty must be in" in r.json()["error"]["message"]
    for options in ({"temperature": 1e-300}, {"repeat_penalty": 1e-300}):
        r = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                        "options": {**options, "num_predict": 3}}, timeout=60)
        assert r.status_code in (200, 400) and ("error" not in r.json() or "repetition_penalty" in r.json()["error"]), r.text
    t.join(60)
    assert live["r"]["choices"][0]["message"] == control["choices"][0]["message"]


def test_every_string_is_checked_at_the_boundary(srv):
    """D2: a lone surrogate anywhere (a tool's name, an assistant tool call, Ollama's system) is a 400 naming it."""
    bad = "\\ud800"
    cases = [
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
         '"function", "function": {"name": "%s", "parameters": {}}}]}' % bad, "tools[0].function.name"),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": '
         '"1", "type": "function", "function": {"name": "%s", "arguments": "{}"}}]}]}' % bad, "messages[0].tool_calls[0].function.name"),
        ("/api/generate", '{"model": "tiny", "prompt": "hi", "system": "%s"}' % bad, "system"),
    ]
    for path, body, where in cases:
        r = httpx.post(srv.url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        message = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
        assert where in message and "lone surrogate" in message


def test_ollama_options_are_typed_and_curl_style_json_is_read(srv):
    """D3, D9, D10: options of the wrong type are Ollama's 400; a body without a JSON content type (curl -d) is
    read as JSON; window options are bounded."""
    r = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "hi", "options": {"top_k": "x"}}, timeout=30)
    assert r.status_code == 400 and "top_k" in r.json()["error"] and set(r.json()) == {"error"}
    r = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                    "options": {"repeat_last_n": 10**12, "num_predict": 4}}, timeout=30)
    assert r.status_code == 400 and "repeat_last_n" in r.json()["error"]
    body = b'{"model": "tiny", "prompt": "Why is the sky blue?", "stream": false, "options": {"num_predict": 3}}'
    r = httpx.post(srv.url + "/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200 and r.json()["done"], r.text
    r = httpx.post(srv.url + "/api/chat", content=b'{"model": "tiny", "messages": 5}', timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_one_request_cannot_fill_the_queue(srv):
    """D6: prompts x n and stop lists are capped, with the limit in the error."""
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": ["hi"] * 1000, "max_tokens": 1}, timeout=30)
    assert r.status_code == 422 and "at most 16" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 4, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 8  # within both caps (this server's client share is 8)
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "stop": ["x"] * 17}, timeout=30)
    assert r.status_code == 422 and "at most 16" in r.json()["error"]["message"]


def test_the_key_comes_before_the_body_and_covers_metrics(store):
    """D7, D8: without the key nothing is parsed; /docs and /openapi.json are off unless asked; /metrics needs the key
    unless opened."""
    s = Running(["tiny"], api_key="sekret")
    try:
        for path in ("/v1/chat/completions", "/api/generate"):
            r = httpx.post(s.url + path, content=b"{bad", headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 401, r.text
            r = httpx.post(s.url + path, content=b"x" * (2 << 20), timeout=30)  # over the body limit: still 401 first
            assert r.status_code == 401
        assert httpx.post(s.url + "/api/generate", content=b"{bad").json() == {"error": "missing or wrong API key: send Authorization: Bearer KEY"}
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(s.url + "/docs").status_code == 404 and httpx.get(s.url + "/openapi.json").status_code == 404
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
    s = Running(["tiny"], api_key="sekret", docs=True, open_metrics=True)
    try:
        assert httpx.get(s.url + "/metrics").status_code == 200 and httpx.get(s.url + "/openapi.json").status_code == 200
    finally:
        s.stop()


def test_no_request_the_schema_allows_makes_a_5xx(store):
    """A property-based fuzzer over the app's own OpenAPI schema (schemathesis; from app.openapi() in this process, so
    /openapi.json can stay off), every operation, against a real server over sockets: no answer is a 5xx. Bounded:
    a fixed number of examples per operation, derandomized (the same requests every run)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    s = Running(["tiny"], max_tokens_limit=8)
    try:
        from fastapi import FastAPI

        app = next(getattr(r, "app") for r in [s.server.config] if isinstance(getattr(r, "app"), FastAPI))
        schema = schemathesis.openapi.from_dict(app.openapi())
        checked = []
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def no_5xx(case) -> None:
                r = case.call(base_url=s.url, timeout=60)
                assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:300])

            no_5xx()
            checked.append(operation.label)
        assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /api/generate", "POST /api/chat"} <= set(checked)
    finally:
        s.stop()


def test_the_server_knows_each_client_share(store, monkeypatch):
    """Over sockets: each request's client (its address) reaches the scheduler that enforces the shares, on both APIs
    and in the reader threads that generate (test_scheduler tests the shares themselves)."""
    from slmkit.engine import scheduler

    seen: list[str] = []
    submit = scheduler.BatchScheduler.submit

    def recording(self, *args, **kwargs):
        seen.append(scheduler.CLIENT.get())
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(scheduler.BatchScheduler, "submit", recording)
    s = Running(["tiny"], max_tokens_limit=8)
    try:
        assert httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 3}, timeout=60).status_code == 200
        assert httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "stream": True}, timeout=60).status_code == 200
        r = httpx.post(s.url + "/api/generate", json={"model": "tiny", "prompt": "The", "stream": False, "options": {"num_predict": 2}}, timeout=60)
        assert r.status_code == 200
        assert seen and set(seen) == {"127.0.0.1"}, seen
    finally:
        s.stop()
