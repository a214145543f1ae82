"""Speculative decoding by prompt lookup: drafts from the context, checked in one pass, the same greedy tokens."""

from __future__ import annotations

import pytest
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


def test_speculative_is_off_when_sampling_and_the_cli_takes_it(store):
    backend = slmkit.load("tiny", backend="torch").backend
    ids = backend.encode("a b a b a b a b")
    calls = []
    real = backend.fast.forward
    backend.fast.forward = lambda cache, tokens, first=0, every=False: calls.append(every) or real(cache, tokens, first, every)
    try:
        list(backend.stream_tokens(ids, SamplingParams(temperature=0.8, seed=1, speculative=4), 12))
    finally:
        backend.fast.forward = real
    assert not any(calls)  # sampling: plain decoding (drafts are checked for greedy decoding only)
    with pytest.raises(SlmkitError, match="speculative must be in"):
        SamplingParams(speculative=99)
    runner = CliRunner()
    a = runner.invoke(app, ["run", "tiny", "--raw", "--temperature", "0", "-n", "12", "--speculative", "4", "one two one two one two"])
    b = runner.invoke(app, ["run", "tiny", "--raw", "--temperature", "0", "-n", "12", "one two one two one two"])
    assert a.exit_code == 0 and a.output == b.output
