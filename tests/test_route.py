"""Routing: the pure pieces (curve, policies, signals, cache, A/B split, drift), the cascade on real tiny models with
a second real server on loopback as the large target, calibration, and the server's routed names, cache and split."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_llama, snapshot
from test_serve import Running, client

from slmkit.engine.decode import Step
from slmkit.errors import SlmkitError
from slmkit.route import curve as rc
from slmkit.route.ab import Split, parse_split
from slmkit.route.cache import ResponseCache
from slmkit.route.cascade import RoutedModel
from slmkit.route.drift import DriftWatch, Reference, psi
from slmkit.route.policies import Chain, Confidence, Router, Rules, fit_classifier
from slmkit.route.signals import signals_of, step_entropy
from slmkit.route.targets import Local
from slmkit.sources.endpoint import Endpoint, TargetUnavailable

GREEDY = {"temperature": 0.0, "max_tokens": 8, "repetition_penalty": 1.0}  # as the OpenAI routes do


# ---- pure pieces ---------------------------------------------------------------------------------------------------
def test_curve_ends_at_small_and_large_and_a_perfect_score_beats_random():
    small = [1, 0, 1, 0, 1, 0, 1, 0]
    large = [1, 1, 1, 1, 1, 1, 1, 0]
    oracle = [float(s) for s in small]  # sure exactly where the small model is right
    pts = rc.curve(small, large, oracle)
    assert pts[0].escalated == 0 and pts[0].quality == pytest.approx(0.5)
    assert pts[-1].escalated == 1 and pts[-1].quality == pytest.approx(7 / 8)
    assert rc.beats_random_everywhere(pts, small, large) and rc.area_over_random(pts, small, large) > 0.05
    inverse = [-s for s in oracle]  # escalates exactly the wrong ones first
    assert rc.area_over_random(rc.curve(small, large, inverse), small, large) < 0
    best = rc.pick(pts, sum(large) / 8, target=1.0)
    assert best.escalated == pytest.approx(0.5) and best.quality == pytest.approx(7 / 8)  # the 4 wrong ones escalated: the large quality
    assert rc.pick(pts, sum(large) / 8, max_escalation=0.25).escalated <= 0.25
    # the threshold really splits the scores: items below it are the escalated ones
    assert sum(1 for s in oracle if s < best.threshold) / 8 == best.escalated


def test_curve_bad_input():
    pts = rc.curve([1, 0], [1, 1], [0.2, 0.8])
    with pytest.raises(SlmkitError, match="exactly one"):
        rc.pick(pts, 1.0)
    with pytest.raises(SlmkitError, match="out of range"):
        rc.pick(pts, 1.0, max_escalation=1.5)
    with pytest.raises(SlmkitError, match="outside the dev set's score range"):
        rc.at_threshold(pts, 3.0, [0.2, 0.8])
    with pytest.raises(SlmkitError):
        rc.curve([], [], [])


def test_signals_and_entropy():
    sure = Step(1, math.log(0.99), ((1, math.log(0.99)), (2, math.log(0.01))))
    unsure = Step(1, math.log(0.3), ((1, math.log(0.3)), (2, math.log(0.3)), (3, math.log(0.3))))
    assert step_entropy(sure) < step_entropy(unsure)
    a, b = signals_of([sure, sure]), signals_of([sure, unsure])
    assert a.mean_logprob > b.mean_logprob and a.min_logprob > b.min_logprob and a.neg_entropy > b.neg_entropy
    assert signals_of([]).mean_logprob == -math.inf  # no answer: least sure


def test_policies_rules_confidence_router():
    rules = Rules(max_chars=20, keywords=("refund",), pattern=r"\d{4}-\d{4}")
    assert rules.decide("short").escalate is False
    assert rules.decide("x" * 21).reason == "length"
    assert rules.decide("I want a REFUND now").reason == "keyword"
    assert rules.decide("card 1234-5678").reason == "regex"
    assert rules.decide("refunded").escalate is False  # whole words only
    with pytest.raises(SlmkitError, match="does not compile"):
        Rules(pattern="(")
    conf = Confidence(-1.0)
    sure, unsure = signals_of([Step(1, -0.1)]), signals_of([Step(1, -3.0)])
    assert not conf.decide("q", signals=sure).escalate and conf.decide("q", signals=unsure).escalate
    with pytest.raises(SlmkitError):
        Confidence(0.0, signal="vibes")
    # a classifier on separable features: positives far from negatives
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 6, generator=g) + 2, torch.randn(40, 6, generator=g) - 2])
    y = torch.tensor([1.0] * 40 + [0.0] * 40)
    clf = fit_classifier(x, y)
    router = Router(clf, 0.5)
    assert not router.decide("q", embedding=[2.0] * 6).escalate and router.decide("q", embedding=[-2.0] * 6).escalate
    with pytest.raises(SlmkitError, match="same label"):
        fit_classifier(x, torch.ones(80))
    chain = Chain((rules, conf))
    assert chain.decide_before("refund please").reason == "keyword" and chain.decide_after("q", unsure).reason == "confidence"


def test_cache_exact_semantic_ttl_and_bound():
    now = [0.0]
    c = ResponseCache(max_entries=2, ttl_s=10, similarity=0.9, clock=lambda: now[0])
    k1, ctx1 = ResponseCache.keys("m", [{"role": "user", "content": "hello"}], {"temperature": 0})
    c.put(k1, "hi!", 2, "stop", context=ctx1, embedding=[1.0, 0.0])
    assert c.get(k1, ctx1).text == "hi!" and c.saved_tokens == 2
    k2, ctx2 = ResponseCache.keys("m", [{"role": "user", "content": "hello there"}], {"temperature": 0})
    assert ctx2 == ctx1 and k2 != k1
    assert c.get(k2, ctx2, [0.99, 0.1]).text == "hi!" and c.semantic_hits == 1  # a paraphrase
    assert c.get(k2, ctx2, [0.0, 1.0]) is None  # not similar enough
    k3, ctx3 = ResponseCache.keys("m", [{"role": "system", "content": "be rude"}, {"role": "user", "content": "hello"}], {"temperature": 0})
    assert ctx3 != ctx1 and c.get(k3, ctx3, [1.0, 0.0]) is None  # another conversation never matches
    c.put(k2, "a", 1, "stop")
    c.put(k3, "b", 1, "stop")
    assert len(c) == 2 and c.evictions == 1 and c.get(k1, ctx1) is None  # least recently used went first
    now[0] = 11
    assert c.get(k3, ctx3) is None and len(c) == 0  # expired
    with pytest.raises(SlmkitError):
        ResponseCache(max_entries=0)
    with pytest.raises(SlmkitError):
        ResponseCache(similarity=1.5)


def test_ab_split_is_sticky_and_follows_the_shares():
    s = parse_split("ab=big:0.9,student:0.1")
    assert s.arms == ("big", "student")
    keys = [f"user-{i}" for i in range(20000)]
    share = sum(s.arm(k) == "student" for k in keys) / len(keys)
    assert 0.09 < share < 0.11
    assert all(s.arm(k) == s.arm(k) for k in keys[:100])
    for bad in ("ab=big:0.5,student:0.6", "ab=big:1", "nosplit", "ab=big:x,student:0.5", "ab=big:0.5,big:0.5"):
        with pytest.raises(SlmkitError):
            parse_split(bad)


def test_drift_psi():
    rng = random.Random(0)
    ref = [rng.gauss(100, 20) for _ in range(2000)]
    r = Reference.of(ref)
    assert psi(r.expected, r.expected) == pytest.approx(0)
    w = DriftWatch({"prompt_chars": r}, escalation_rate=0.2, window=200)
    for _ in range(200):
        w.observe("prompt_chars", rng.gauss(100, 20))
        w.observe_escalation(rng.random() < 0.2)
    assert w.psi("prompt_chars") < 0.1 and not w.drifted()
    for _ in range(200):
        w.observe("prompt_chars", rng.gauss(300, 20))  # much longer prompts
        w.observe_escalation(rng.random() < 0.8)
    assert w.psi("prompt_chars") > 1 and set(w.drifted()) == {"prompt_chars", "escalation"}


# ---- the cascade on real models ------------------------------------------------------------------------------------
@pytest.fixture
def pair(store, tmp_path_factory):
    """'tiny' (small) and 'other' (large): two different tiny models with the same tokenizer."""
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path_factory.mktemp("other") / "other", seed=7), "other")
    return "tiny", "other"


def _answer(name, msgs):
    from slmkit.loading import load

    return load(name).chat(msgs, **GREEDY)


def test_cascade_escalates_below_threshold_and_falls_back_when_the_large_fails(pair):
    from slmkit.loading import load

    small, large = load("tiny"), load("other")
    msgs = [{"role": "user", "content": "hello"}]
    seen = []
    always = RoutedModel("auto", small, Local(large), Chain((Confidence(math.inf),)), on_outcome=[seen.append])
    never = RoutedModel("auto", small, Local(large), Chain((Confidence(-math.inf),)), on_outcome=[seen.append])
    assert always.chat(msgs, **GREEDY) == large.chat(msgs, **GREEDY) != small.chat(msgs, **GREEDY)
    assert seen[-1].answered_by == "large" and seen[-1].decision.reason == "confidence" and seen[-1].signals.tokens > 0
    assert never.chat(msgs, **GREEDY) == small.chat(msgs, **GREEDY) and seen[-1].answered_by == "small"
    # rules decide before: the small model is never run, the answer streams from the large one
    rule = RoutedModel("auto", small, Local(large), Chain((Rules(keywords=("hello",)),)), on_outcome=[seen.append])
    gen = rule.stream_chat(msgs, **GREEDY)
    pieces = list(gen)
    assert "".join(pieces) == large.chat(msgs, **GREEDY) and seen[-1].small_s is None and seen[-1].decision.reason == "keyword"
    # a large endpoint that is down: the small answer stands in, marked
    down = Endpoint("http://127.0.0.1:9/v1", "x", timeout=2)
    fb = RoutedModel("auto", small, down, Chain((Confidence(math.inf),)), on_outcome=[seen.append])
    assert fb.chat(msgs, **GREEDY) == small.chat(msgs, **GREEDY)
    assert seen[-1].answered_by == "small_fallback" and "Connection" in seen[-1].error
    with pytest.raises(TargetUnavailable, match="does not answer"):
        down.check()
    # small-only: the decision is logged, nothing escalates
    so = RoutedModel("auto", small, down, Chain((Confidence(math.inf),)), small_only=True, on_outcome=[seen.append])
    assert so.chat(msgs, **GREEDY) == small.chat(msgs, **GREEDY) and seen[-1].would_escalate and seen[-1].answered_by == "small"


def test_endpoint_target_is_a_real_second_server(pair):
    big = Running(["other"])
    try:
        ep = Endpoint(big.url + "/v1")
        ep.check()
        assert ep.model == "other"
        msgs = [{"role": "user", "content": "hello"}]
        assert "".join(ep.stream_chat(msgs, **GREEDY)) == _answer("other", msgs)
        with pytest.raises(TargetUnavailable, match="does not serve"):
            Endpoint(big.url + "/v1", "nope").check()
    finally:
        big.stop()


# ---- calibration ---------------------------------------------------------------------------------------------------
def _qa_dev(tmp_path, n=24):
    """Questions whose reference is the small model's own answer for even items and the large model's for odd ones:
    each model is right on its half, so routing has something to find."""
    from slmkit.loading import load

    small, large = load("tiny"), load("other")
    rows = []
    for i in range(n):
        q = f"question number {i}: {'why' if i % 3 else 'how'} is the sky blue?"
        m = [{"role": "user", "content": q}]
        ref = (small if i % 2 == 0 else large).chat(m, max_tokens=64, temperature=0.0, repetition_penalty=1.0)
        rows.append({"prompt": q, "answer": ref or "x"})
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_calibrate_qa_saves_a_router_with_its_curve(pair, tmp_path):
    from slmkit.route.calibrate import calibrate_stage
    from slmkit.sources.forms import read_router
    from slmkit.store import Store

    dev = _qa_dev(tmp_path)
    card, report = calibrate_stage("tiny", "other", data=dev, target=0.95, name="auto", out=tmp_path / "cal.json")
    assert card.stage == "route" and card.parent == "tiny" and report["n"] == 24
    assert report["small_quality"] == pytest.approx(0.5, abs=0.1) and report["large_quality"] == pytest.approx(0.5, abs=0.1)
    folder = Store().path("auto")
    router = read_router(folder)
    assert router["large"] == {"store": "other"} and router["policies"][0]["kind"] == "confidence"
    assert (folder / "calibration.png").stat().st_size > 10_000 and json.loads((tmp_path / "cal.json").read_text())["points"]
    # the picked point reaches the target where any point does
    p = report["picked"]
    assert p["quality"] >= 0.95 * report["large_quality"] - 1e-9 or p["quality"] == max(
        q["quality"] for q in report["points"][next(iter(report["points"]))])
    runner = CliRunner()
    from slmkit.cli import app

    r = runner.invoke(app, ["run", "auto", "hi"])
    assert r.exit_code == 1 and "is a router" in r.output
    r = runner.invoke(app, ["route", "show", "auto"])
    assert r.exit_code == 0 and '"small": "tiny"' in r.output


def test_calibrate_multiple_choice_trains_a_router(pair, tmp_path):
    from slmkit.route.calibrate import calibrate_stage
    from slmkit.sources.forms import read_router
    from slmkit.store import Store

    card, report = calibrate_stage("tiny", "other", task="arc_easy", limit=40, max_escalation=0.3, name="mc-route")
    assert report["policy"] == "router" and report["picked"]["escalated"] <= 0.3
    assert set(report["curves"]) == {"confidence (choice_probability)", "trained router"}
    router = read_router(Store().path("mc-route"))
    assert router["policies"][0]["kind"] == "router" and len(router["policies"][0]["classifier"]["weight"]) == 32  # hidden size


def test_calibrate_bad_input_changes_nothing(pair, tmp_path):
    from slmkit.cli import app

    runner = CliRunner()
    unlabelled = tmp_path / "nolabels.jsonl"
    unlabelled.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    before = snapshot(tmp_path.parent)
    cases = [
        (["--data", str(unlabelled), "--target", "0.9"], "no reference answer"),
        (["--task", "arc_easy", "--limit", "8", "--target", "0.9", "--policy", "confidence"], "multiple-choice"),
        (["--data", str(unlabelled), "--target", "0.9", "--max-escalation", "0.2"], "exactly one"),
        (["--data", str(unlabelled)], "exactly one"),
        (["--task", "arc_easy", "--target", "0.9", "--large", "http://127.0.0.1:9/v1"], "OpenAI endpoint"),
    ]
    for extra, msg in cases:
        args = ["route", "calibrate", "--small", "tiny", "--large", "other", *extra]
        if "--large" in extra:
            args = ["route", "calibrate", "--small", "tiny", *extra]
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and msg in r.output, (extra, r.output)
    r = runner.invoke(app, ["route", "calibrate", "--small", "tiny", "--large", "http://127.0.0.1:9/v1", "--data", str(_qa_dev(tmp_path, 4)), "--target", "0.9"])
    assert r.exit_code == 1 and "does not answer" in r.output
    assert [p for p in snapshot(tmp_path.parent) if "models/" in p and "route" in p] == [p for p in before if "models/" in p and "route" in p]


# ---- in the server -------------------------------------------------------------------------------------------------
def test_server_routes_to_a_second_server_with_metrics_log_and_fallback(pair, tmp_path):
    import httpx

    from slmkit.route.calibrate import calibrate_stage
    from slmkit.store import Store

    big = Running(["other"])
    try:
        calibrate_stage("tiny", big.url + "/v1", data=_qa_dev(tmp_path, 12), max_escalation=0.5, name="auto")
        # force every answer to escalate (threshold above any confidence), keep the rest of the calibrated router
        path = Store().path("auto") / "router.json"
        router = json.loads(path.read_text())
        router["policies"] = [{"kind": "confidence", "threshold": 1e9, "signal": "mean_logprob"}]
        path.write_text(json.dumps(router))
        log = tmp_path / "decisions.jsonl"
        s = Running(["tiny", "auto"], decision_log=log)
        try:
            c = client(s)
            msgs = [{"role": "user", "content": "hello"}]
            r = c.chat.completions.create(model="auto", messages=msgs, max_tokens=8, temperature=0)
            assert r.model == "auto" and r.choices[0].message.content == _answer("other", msgs)
            raw = httpx.post(s.url + "/v1/chat/completions", json={"model": "auto", "messages": msgs, "max_tokens": 8, "temperature": 0}).json()
            assert raw["slmkit"]["choices"][0]["answered_by"] == "large"
            streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="auto", messages=msgs, max_tokens=8, temperature=0, stream=True) if ch.choices)
            assert streamed == _answer("other", msgs)
            bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "auto", "messages": msgs, "logprobs": True})
            assert bad.status_code == 400 and "routed" in bad.json()["error"]["message"]
            big.stop()  # the large server goes away: answers fall back to the small model, marked
            raw = httpx.post(s.url + "/v1/chat/completions", json={"model": "auto", "messages": msgs, "max_tokens": 8, "temperature": 0}).json()
            assert raw["slmkit"]["choices"][0]["answered_by"] == "small_fallback"
            assert raw["choices"][0]["message"]["content"] == _answer("tiny", msgs)
            m = httpx.get(s.url + "/metrics").text
            assert 'slmkit_route_decisions_total{answered_by="large",reason="confidence",route="auto"} 3.0' in m
            assert 'slmkit_route_large_calls_total{outcome="error",route="auto"} 1.0' in m
            assert 'slmkit_route_drift_psi{route="auto",signal="prompt_chars"}' in m
            lines = [json.loads(x) for x in log.read_text().splitlines()]
            assert len(lines) == 4 and lines[-1]["answered_by"] == "small_fallback" and "hello" not in log.read_text()
        finally:
            s.stop()
        with pytest.raises(TargetUnavailable):  # at start: the large endpoint is down
            Running(["auto"])
        s = Running(["auto"], small_only=True)
        try:
            r = client(s).chat.completions.create(model="auto", messages=msgs, max_tokens=8, temperature=0)
            assert r.choices[0].message.content == _answer("tiny", msgs)
        finally:
            s.stop()
    finally:
        big.stop()


def test_server_response_cache_and_ab_split(pair):
    import httpx

    s = Running(["tiny", "other"], cache=lambda: ResponseCache(8, 60), splits=[Split("ab", ("tiny", "other"), (0.5, 0.5))])
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
        first = httpx.post(s.url + "/v1/chat/completions", json=body).json()
        second = httpx.post(s.url + "/v1/chat/completions", json=body).json()
        assert "slmkit" not in first and second["slmkit"]["choices"][0]["cached"] is True
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        assert second["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]
        sampled = dict(body, temperature=1.0)
        for _ in range(2):
            assert "slmkit" not in httpx.post(s.url + "/v1/chat/completions", json=sampled).json()  # never cached
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client(s).chat.completions.create(
            model="tiny", messages=body["messages"], max_tokens=8, temperature=0, stream=True) if ch.choices)
        assert streamed == first["choices"][0]["message"]["content"]  # a hit streams too
        m = httpx.get(s.url + "/metrics").text
        assert 'slmkit_cache_requests_total{model="tiny",result="hit"} 2.0' in m
        assert f'slmkit_cache_saved_tokens_total{{model="tiny"}} {2.0 * first["usage"]["completion_tokens"]}' in m
        # the split: one user always lands on one arm; many users spread over both
        answers = {a: _answer(a, body["messages"]) for a in ("tiny", "other")}
        assert answers["tiny"] != answers["other"]
        got = {httpx.post(s.url + "/v1/chat/completions", json=dict(body, model="ab", user="alice")).json()["choices"][0]["message"]["content"]
               for _ in range(4)}
        assert len(got) == 1 and got <= set(answers.values())
        for i in range(16):
            httpx.post(s.url + "/v1/chat/completions", json=dict(body, model="ab", user=f"u{i}"))
        m = httpx.get(s.url + "/metrics").text
        assert 'slmkit_ab_requests_total{arm="tiny",split="ab"}' in m and 'slmkit_ab_requests_total{arm="other",split="ab"}' in m
        assert [x.id for x in client(s).models.list().data] == ["tiny", "other", "ab"]
    finally:
        s.stop()
    with pytest.raises(SlmkitError, match="not served"):
        Running(["tiny"], splits=[Split("ab", ("tiny", "other"), (0.5, 0.5))])


def test_the_flywheel_escalations_train_a_student_that_escalates_less(pair, tmp_path):
    """Opt-in escalation log -> `route harvest` -> the small model fine-tuned on the large model's answers: on
    held-out prompts of the same kind, the same confidence threshold escalates fewer of them."""
    import statistics

    from slmkit.loading import load
    from slmkit.route.calibrate import calibrate_stage
    from slmkit.store import Store
    from slmkit.train.finetune import finetune_stage
    from slmkit.train.loop import TrainConfig

    ask = lambda i: [{"role": "user", "content": f"Tell me about the red fox number {i}."}]  # noqa: E731
    greedy = {"max_tokens": 8, "temperature": 0.0, "repetition_penalty": 1.0}

    def confidence(model, i):
        gen = model.stream_chat(ask(i), **greedy)
        gen.read()
        return signals_of(gen.steps).get("mean_logprob")

    tiny = load("tiny")
    threshold = statistics.median(confidence(tiny, i) for i in range(24))  # about half of these prompts escalate
    calibrate_stage("tiny", "other", data=_qa_dev(tmp_path, 12), max_escalation=0.5, name="auto")
    path = Store().path("auto") / "router.json"
    router = json.loads(path.read_text())
    router["policies"] = [{"kind": "confidence", "threshold": threshold, "signal": "mean_logprob"}]
    path.write_text(json.dumps(router))
    from slmkit.serve.hybrid import EscalationLog

    log = tmp_path / "escalations.jsonl"
    s = Running(["auto"], escalation_log=EscalationLog(log, 100), decision_log=tmp_path / "d.jsonl")
    try:
        answered = [client(s).chat.completions.create(model="auto", messages=ask(i), max_tokens=8, temperature=0) for i in range(24)]
    finally:
        s.stop()
    assert answered and "red fox" not in (tmp_path / "d.jsonl").read_text()  # the decision log keeps no text
    r = CliRunner().invoke(__import__("slmkit.cli", fromlist=["app"]).app,
                           ["route", "harvest", str(log), "--out", str(tmp_path / "next.jsonl"), "--route", "auto", "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "next.jsonl").read_text().splitlines()]
    assert 4 <= len(rows) <= 20 and all(row["messages"][-1]["role"] == "assistant" for row in rows)
    assert rows[0]["messages"][-1]["content"] == _answer("other", rows[0]["messages"][:-1])  # the large model's answer
    finetune_stage("tiny", [tmp_path / "next.jsonl"], method="full", seq_len=48, name="tiny-next",
                   config=TrainConfig(steps=40, batch_size=4, lr=3e-3))
    held_out = range(100, 116)
    before = sum(confidence(tiny, i) < threshold for i in held_out)
    after = sum(confidence(load("tiny-next"), i) < threshold for i in held_out)
    assert after < before, (before, after)


def test_a_confidence_router_calibrates_when_the_small_model_always_loses(pair, tmp_path):
    """Every reference is the large model's answer, so the small one is worse on every prompt: the trained router
    (only a comparison under the confidence policy) has nothing to learn and is left out; the cascade is still made
    (escalating what it must). Served by the router policy, the same dev set is refused with what to do."""
    from slmkit.loading import load
    from slmkit.route.calibrate import calibrate_stage

    large = load("other")
    rows = []
    for i in range(8):
        q = f"question {i}: why is the sky blue?"
        rows.append({"prompt": q, "answer": large.chat([{"role": "user", "content": q}], max_tokens=64, temperature=0.0,
                                                       repetition_penalty=1.0) or "x"})
    dev = tmp_path / "lose.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small_answers = [load("tiny").chat([{"role": "user", "content": r["prompt"]}], max_tokens=64, temperature=0.0,
                                      repetition_penalty=1.0) for r in rows]
    assert all(a != r["answer"] for a, r in zip(small_answers, rows))  # exact match: the small model loses everywhere
    card, report = calibrate_stage("tiny", "other", data=dev, target=0.95, name="always-up")
    assert "trained router" not in report["curves"] and report["small_quality"] == 0 and report["large_quality"] == 1
    assert card.settings["escalated"] == 1.0
    with pytest.raises(SlmkitError, match="nothing to learn"):
        calibrate_stage("tiny", "other", data=dev, target=0.95, policy="router", name="never")
