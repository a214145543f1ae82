"""Speculative decoding by prompt lookup: drafts from the context, checked in one pass, the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.speculative import BACKOFF, PromptLookup, Throttle, lookup
from slmkit.errors import SlmkitError


def test_lookup_proposes_what_followed_the_latest_earlier_ngram():
    assert lookup([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # "2 3" occurred before: then 4, 9
    assert lookup([5, 1, 2, 7, 1, 2, 8, 6, 1, 2], 3) == [8, 6, 1]  # the latest occurrence wins
    assert lookup([1, 2, 3, 4], 2) == []  # nothing repeats
    assert lookup([4, 7, 8, 4], 5) == [7, 8, 4]  # a shorter n-gram when the longer has no earlier occurrence
    assert lookup([], 3) == [] and lookup([3], 3) == []


def test_the_lookup_index_equals_scanning_the_history():
    """PromptLookup's n-gram index, grown a token at a time, proposes what a scan of the whole history finds."""
    import random

    def scan(history, draft, max_ngram=3):
        for n in range(min(max_ngram, len(history) - 1), 0, -1):
            for start in range(len(history) - n - 1, -1, -1):
                if history[start:start + n] == history[len(history) - n:]:
                    return history[start + n: start + n + draft]
        return []

    rng = random.Random(0)
    for _ in range(20):
        seq = [rng.randrange(6) for _ in range(60)]
        index = PromptLookup(seq[:5])
        for i in range(5, len(seq)):
            assert index.draft(4) == scan(seq[:i], 4)
            index.push(seq[i])


def test_the_throttle_pauses_drafting_while_checks_lose_and_resumes():
    """Checks slower per token than plain steps pause drafting for a doubling number of plain tokens; a winning check
    resets the pause; before any plain step is timed, one is forced after the first check."""
    t = Throttle()
    assert t.allow()
    t.checked(0.010, drafted=4, kept=0)  # no plain step timed yet: nothing to compare with
    assert not t.allow() and t.paused == 0
    t.plain(0.004)
    assert t.allow()
    t.checked(0.010, drafted=4, kept=1)  # 5 ms per token > 4 ms: pause
    assert not t.allow() and t.paused == BACKOFF[0]
    for _ in range(BACKOFF[0]):
        t.plain(0.004)
    assert t.allow()
    t.checked(0.012, drafted=4, kept=0)  # still losing: twice as long
    assert t.paused == 2 * BACKOFF[0]
    for _ in range(t.paused):
        t.plain(0.004)
    t.checked(0.006, drafted=4, kept=4)  # 1.2 ms per token: keeps drafting, the pause back to its start
    assert t.allow() and t.backoff == BACKOFF[0]
    assert (t.checks, t.drafted, t.accepted) == (4, 16, 5) and t.acceptance == 5 / 16


@pytest.mark.parametrize("draft", [1, 4, 8])
def test_speculative_greedy_gives_the_same_tokens_and_checks_drafts(store, draft):
    """On a prompt the model can copy from: the tokens and their log-probabilities equal plain greedy decoding's,
    drafts were checked in multi-token passes, and rejected drafts left nothing in the cache."""
    backend = slmkit.load("tiny", backend="torch").backend
    backend._eos = frozenset()  # run the whole budget
    text = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"
    ids = backend.encode(text)
    plain = SamplingParams(temperature=0, repetition_penalty=1.0, top_logprobs=2)
    spec = SamplingParams(temperature=0, repetition_penalty=1.0, top_logprobs=2, speculative=draft)
    want = list(backend.stream_steps(ids, plain, 40))
    calls = []
    real = backend.fast.forward
    backend.fast.forward = lambda cache, tokens, *a, **kw: calls.append(tokens.numel()) or real(cache, tokens, *a, **kw)
    try:
        got = list(backend.stream_steps(ids, spec, 40))
    finally:
        backend.fast.forward = real
    assert [s.token for s in got] == [s.token for s in want]
    for a, b in zip(got, want):
        assert abs(a.logprob - b.logprob) < 1e-3 and [t for t, _ in a.top] == [t for t, _ in b.top]
    checks = [n for n in calls[1:] if n > 1]
    assert checks and max(checks) <= draft + 1  # drafts were checked, never more than asked
    assert len(calls) - 1 < 39  # fewer forward passes than tokens
    assert sum(s.checked for s in got) == sum(checks) - len(checks) and sum(s.drafted for s in got) > 0  # marked


@pytest.mark.parametrize("family,scheme", [("llama", None), ("llama", "w8a8"), ("llama", "w4a8"), ("gemma3_text", "w8a8")])
def test_a_check_gives_each_row_what_one_token_steps_give(store, tmp_path, family, scheme):
    """LeanForward.check runs the drafted tokens as rows of one slot on the one-token step's kernels: on integer
    models each row's logits are bit-identical to decoding the tokens one at a time (so greedy text cannot part), on
    float ones within float rounding; the cache after it (and after forgetting rejected rows) is the same too. Gemma 3:
    rows past its sliding window."""
    from conftest import build_family_model

    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.sources.importer import import_path

    name = "tiny"
    if family != "llama":
        name = family.replace("_", "-")
        import_path(build_family_model(tmp_path / name, family, window=5), name)
    if scheme:
        quantize_stage(name, scheme, name=f"{name}-{scheme}", group_size=32 if scheme == "w4a8" else None)
        name = f"{name}-{scheme}"
    fast = slmkit.load(name, backend="torch").backend.fast
    if fast.kernels is None:
        pytest.skip("slmkit's decode kernels are not built here: checks run as one multi-position row")
    prompt, tokens = [1, 5, 9, 4, 7, 2], [3, 8, 6, 12, 10, 11]
    caches = [fast.new_cache(1, capacity=8), fast.new_cache(1, capacity=8)]
    with torch.inference_mode():
        for cache in caches:
            fast.forward(cache, torch.tensor([prompt]))
        together = fast.check(caches[0], 0, tokens)
        alone = torch.stack([fast.forward(caches[1], torch.tensor([[t]]))[0] for t in tokens])
    if scheme:
        assert torch.equal(together, alone)
    else:
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert caches[0].lens == caches[1].lens == [len(prompt) + len(tokens)]
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-6, rtol=0)
    caches[0].drop(0, 4)  # four drafts refused: the next token sees the prompt and the first two
    with torch.inference_mode():
        again = fast.forward(caches[0], torch.tensor([[tokens[2]]]))[0]
    torch.testing.assert_close(again, alone[2], atol=1e-5, rtol=1e-5)


def test_speculative_sampling_keeps_the_distribution_and_the_cli_takes_it(store):
    """At temperature 1 a draft is kept with its probability and a refusal draws from the rest: over many seeds each
    position's token is distributed as plain sampling's. The model here is a fake with known next-token
    probabilities (the cyclic next token 0 -> 1 -> 2 -> 0 with 0.6), so drafts (the cycle, from the prompt) are often
    checked and often refused."""
    from collections import Counter

    from slmkit.engine.decode import decode_loop

    table = torch.log(torch.tensor([[0.1, 0.6, 0.15, 0.15], [0.15, 0.1, 0.6, 0.15], [0.6, 0.15, 0.1, 0.15],
                                    [0.25, 0.25, 0.25, 0.25]]))  # row t: the next token's distribution after t
    prompt = [0, 1, 2, 0, 1, 2, 0]
    checks = []

    def verify(tokens):
        checks.append(len(tokens))
        return table[torch.tensor(tokens)]

    runs, length = 3000, 6
    seen = {}
    for n in (0, 3):
        counts = [Counter() for _ in range(length)]
        for seed in range(runs):
            params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed, speculative=n)
            steps = decode_loop(table[prompt[-1]], lambda t: table[t], prompt, params, length, frozenset(), verify=verify,
                                rollback=lambda k: None)
            for i, step in enumerate(steps):
                counts[i][step.token] += 1
        seen[n] = counts
    assert len(checks) > runs  # drafts were checked
    for plain, spec in zip(seen[0], seen[3]):  # per position: within sampling noise (~0.01 per token here)
        assert 0.5 * sum(abs(plain[t] - spec[t]) for t in range(4)) / runs < 0.04, (plain, spec)
    with pytest.raises(SlmkitError, match="speculative must be in"):
        SamplingParams(speculative=99)
    runner = CliRunner()
    a = runner.invoke(app, ["run", "tiny", "--raw", "--temperature", "0", "-n", "12", "--speculative", "4", "one two one two one two"])
    b = runner.invoke(app, ["run", "tiny", "--raw", "--temperature", "0", "-n", "12", "one two one two one two"])
    assert a.exit_code == 0 and a.output == b.output


@pytest.mark.parametrize("scheme", [None, "w8a8"])
def test_the_batch_scheduler_checks_drafts_in_its_step_and_keeps_each_requests_tokens(store, scheme):
    """Speculative requests in a continuous batch beside a plain one: each row's drafts run as rows of its slot in
    the batch's one forward; every request gets the tokens and log-probabilities it gets in the same batch without
    drafting (bit for bit on the w8a8 child: the check's layers take the kernels of the batch's plain step), drafts
    were checked and kept, and a request finishing inside its drafts (its budget) stops there."""
    import threading

    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.engine.scheduler import BatchedBackend

    name = "tiny"
    if scheme:
        quantize_stage("tiny", scheme, name=f"tiny-{scheme}")
        name = f"tiny-{scheme}"
    texts = ["The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
             "one two three four five six one two three four five six one two", "Paris is the capital of"]
    lengths = [40, 23, 17]
    results = {}
    for spec in (0, 4):
        inner = slmkit.load(name, backend="torch").backend
        inner._eos = frozenset()  # run the whole budget
        batched = BatchedBackend(inner, max_batch=3)
        if spec and not batched.scheduler.store.checks:
            pytest.skip("slmkit's decode kernels are not built here: the batch does not check drafts")
        got = {}

        def run(i: int) -> None:
            params = SamplingParams(temperature=0, repetition_penalty=1.0, top_logprobs=1, speculative=spec if i < 2 else 0)
            got[i] = list(batched.stream_steps(batched.encode(texts[i]), params, lengths[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batched.scheduler.stop()
        results[spec] = got
    for i in range(3):
        plain, spec = results[0][i], results[4][i]
        assert [s.token for s in spec] == [s.token for s in plain] and len(spec) == lengths[i]
        if scheme:
            assert [s.logprob for s in spec] == [s.logprob for s in plain]
        else:
            assert max(abs(a.logprob - b.logprob) for a, b in zip(spec, plain)) < 1e-3
    assert sum(s.drafted for s in results[4][0]) > 10 and sum(s.checked for s in results[4][0]) > 0
    assert not any(s.drafted or s.checked for s in results[4][2])  # the plain request never drafts


def test_the_server_takes_speculative_per_request_and_reports_acceptance(store):
    """Over a real socket with the official client: `speculative` in the request body (slmkit's own field) and the
    server's --speculative default give the plain answer; /metrics counts the checks, drafted and kept tokens; a
    value out of range is refused."""
    import httpx
    import openai
    from test_serve import Running, client

    srv = Running(["tiny"], max_tokens_limit=48, speculative=4)
    try:
        c = client(srv)
        kw = {"model": "tiny", "prompt": "one two three one two three one two", "max_tokens": 30, "temperature": 0}
        plain = c.completions.create(**kw, extra_body={"speculative": 0}).choices[0].text
        asked = c.completions.create(**kw, extra_body={"speculative": 8}).choices[0].text
        default = c.completions.create(**kw).choices[0].text
        assert asked == plain == default
        metrics = httpx.get(srv.url + "/metrics").text
        counts = {name: float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("slmkit_speculative_")
                  for name in [line.split("{")[0]]}
        if slmkit.load("tiny", backend="torch").backend.fast.kernels is not None:
            assert counts["slmkit_speculative_checks_total"] > 0
            assert 0 < counts["slmkit_speculative_accepted_tokens_total"] <= counts["slmkit_speculative_drafted_tokens_total"]
        with pytest.raises(openai.UnprocessableEntityError, match="speculative"):  # (as every invalid field: 422)
            c.completions.create(**kw, extra_body={"speculative": 99})
    finally:
        srv.stop()
