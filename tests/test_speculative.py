"""Speculative decoding by prompt lookup: drafts from the context, checked in one pass, the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.speculative import lookup
from slmkit.errors import SlmkitError


def test_lookup_proposes_what_followed_the_latest_earlier_ngram():
    assert lookup([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # "2 3" occurred before: then 4, 9
    assert lookup([5, 1, 2, 7, 1, 2, 8, 6, 1, 2], 3) == [8, 6, 1]  # the latest occurrence wins
    assert lookup([1, 2, 3, 4], 2) == []  # nothing repeats
    assert lookup([4, 7, 8, 4], 5) == [7, 8, 4]  # a shorter n-gram when the longer has no earlier occurrence
    assert lookup([], 3) == [] and lookup([3], 3) == []


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
    backend.fast.forward = lambda cache, tokens, first=0, every=False: calls.append(tokens.shape[1]) or real(cache, tokens, first, every)
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

    runs, length = 3000, 4
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
