"""Sampling math: penalties, top-k, top-p, greedy."""

from __future__ import annotations

import pytest
import torch

from slmkit.engine.sampling import (
    SamplingParams, apply_repetition_penalty, make_generator, nucleus_size, sample_next, sample_rows, top_candidates,
)
from slmkit.errors import SlmkitError


def test_repetition_penalty_pushes_seen_tokens_down_per_row():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    apply_repetition_penalty(logits, [[0, 1, 1], [2], [0]], [2.0, 4.0, 1.0])  # in place
    assert logits.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 0.25, 0.5], [2.0, -2.0, 1.0, 0.5]]


def test_batch_sampling_gives_each_row_what_it_would_get_alone():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3  # (B, V)
    params = [SamplingParams(temperature=0, repetition_penalty=50.0), SamplingParams(temperature=0.8, top_k=40, seed=1),
              SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=2), SamplingParams(temperature=0.5, top_k=40, seed=3),
              SamplingParams(temperature=1.2, top_k=7, top_p=0.5, repeat_last_n=2, seed=4)]
    histories = [[int(logits[0].argmax()), 5], [1, 2, 3], [], [7] * 10, list(range(50))]
    for step in range(20):  # same random streams, step after step
        if step == 0:
            alone_gens = [make_generator(p.seed) for p in params]
            batch_gens = [make_generator(p.seed) for p in params]
        alone = [sample_next(logits[r], params[r], histories[r], alone_gens[r]) for r in range(5)]
        before = logits.clone()
        assert sample_rows(logits, params, histories, batch_gens) == alone
        assert torch.equal(logits, before)  # the caller's logits are left as they were
    assert alone[0] != int(logits[0].argmax())  # the greedy row's penalty changed its pick


def test_top_candidates_sorted_and_k_zero_means_all():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0])
    vals, ids = top_candidates(logits, 2)
    assert ids.tolist() == [1, 3] and vals.tolist() == [3.0, 2.0]
    vals, ids = top_candidates(logits, 0)
    assert ids.tolist() == [1, 3, 0, 2]


def test_nucleus_size():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert nucleus_size(logits, 0.5) == 1
    assert nucleus_size(logits, 0.79) == 2
    assert nucleus_size(logits, 0.81) == 3
    assert nucleus_size(logits, 1.0) == 4
    assert nucleus_size(logits, 0.01) == 1  # the top token always stays


def test_greedy_is_argmax_and_sampling_respects_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_next(logits, SamplingParams(temperature=0, repetition_penalty=1.0), [], None) == 1
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=5.0, top_k=2, top_p=1.0, repetition_penalty=1.0)
    seen = {sample_next(logits, p, [], g) for _ in range(200)}
    assert seen == {1, 2}  # hot enough to pick both, but never outside the top 2
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.3, repetition_penalty=1.0)
    assert {sample_next(logits, p, [], g) for _ in range(50)} == {1}


def test_seeded_sampling_repeats():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    run = lambda: [sample_next(logits, p, [], g) for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    assert run() == run()


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"max_tokens": 0}, {"stop": [""]}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(SlmkitError):
        SamplingParams.from_kwargs(**kwargs)


def test_from_kwargs_ignores_none_and_rejects_unknown():
    assert SamplingParams.from_kwargs(temperature=None, seed=3) == SamplingParams(seed=3)
    assert SamplingParams.from_kwargs(stop="\n").stop == ("\n",)
    with pytest.raises(SlmkitError, match="temprature"):
        SamplingParams.from_kwargs(temprature=1)


def test_frequency_and_presence_penalties_and_min_p():
    import torch

    from slmkit.engine.sampling import SamplingParams, apply_additive_penalties, sample_rows

    logits = torch.zeros(1, 5)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    apply_additive_penalties(logits, [[1, 1, 3]], [p])
    assert logits[0].tolist() == [0.0, -2.0, 0.0, -1.5, 0.0]  # token 1: 2 x 0.5 + 1; token 3: 0.5 + 1
    # a greedy row moves off a token it keeps repeating when penalized
    row = torch.tensor([[0.0, 3.0, 2.9, 0.0]])
    assert sample_rows(row, [SamplingParams(temperature=0, repetition_penalty=1.0)], [[1, 1]], [None]) == [1]
    assert sample_rows(row, [SamplingParams(temperature=0, repetition_penalty=1.0, presence_penalty=0.5)], [[1, 1]], [None]) == [2]
    # min_p 1 keeps only the likeliest token, whatever the temperature
    g = torch.Generator().manual_seed(0)
    wide = torch.tensor([[1.0, 1.2, 0.9, 1.1]])
    picks = {sample_rows(wide, [SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=1.0)], [[]], [g])[0]
             for _ in range(20)}
    assert picks == {1}
    with pytest.raises(SlmkitError):
        SamplingParams(min_p=1.5)
    with pytest.raises(SlmkitError):
        SamplingParams(frequency_penalty=3)


def test_extreme_settings_stay_finite_or_are_refused():
    """A temperature too small for float32 samples greedily; penalties and windows outside their bounds are refused."""
    import torch

    from slmkit.engine.sampling import RowsFailed, sample_rows

    logits = torch.randn(2, 50) * 30
    tiny = SamplingParams(temperature=1e-300, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=3)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    assert sample_rows(logits, [tiny, greedy], [[], []], [None, None]) == torch.argmax(logits, dim=-1).tolist()
    for bad in ({"repetition_penalty": 1e-300}, {"repetition_penalty": 1e300}, {"repeat_last_n": 10**12},
                {"temperature": float("inf")}):
        with pytest.raises(SlmkitError, match="bad sampling settings"):
            SamplingParams(**bad)
    nan = logits.clone()
    nan[1] = float("nan")
    with pytest.raises(RowsFailed) as err:
        sample_rows(nan, [greedy, SamplingParams(temperature=0.8, seed=1)], [[], []], [None, torch.Generator().manual_seed(1)])
    assert set(err.value.failed) == {1} and err.value.tokens[0] == int(torch.argmax(logits[0]))


def _kernels():
    from slmkit import native

    kernels = native.ops()
    if kernels is None:
        pytest.skip(f"slmkit's CPU kernels are not built here ({native.unavailable()})")
    return kernels


def test_top_logsumexp_reads_each_row_in_one_pass_as_torch_would():
    """native.top_logsumexp: each row's m largest values and ids (largest first, ties by the lower id) as torch.topk
    gives them, its logsumexp within 1e-5 of torch's, and a row holding inf or NaN flagged."""
    kernels = _kernels()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3000, generator=g) * 4
    values, ids, lse, finite = kernels.top_logsumexp(x, 37)
    want_v, want_i = torch.topk(x, 37)
    assert torch.equal(values, want_v) and torch.equal(ids, want_i) and bool(finite.all())
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), atol=1e-5, rtol=1e-6)
    tied = torch.zeros(1, 50)
    tied[0, [7, 3, 40]] = 1.0
    assert kernels.top_logsumexp(tied, 4)[1].tolist() == [[3, 7, 40, 0]]
    x[1, 5], x[3, 9] = float("nan"), float("-inf")
    assert kernels.top_logsumexp(x, 3)[3].tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=0.7, seed=1),  # the defaults: top-k 40, top-p 0.9, repetition penalty 1.1
    dict(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=1.0, seed=2),
    dict(temperature=0.9, top_k=100, min_p=0.05, repetition_penalty=0.8, seed=3),  # a penalty that raises the window
    dict(temperature=1.2, frequency_penalty=-1.5, presence_penalty=0.5, seed=4),  # OpenAI's, one of them negative
    dict(temperature=0.8, top_k=3, frequency_penalty=2.0, repeat_last_n=8, seed=5),
])
def test_sampling_from_candidates_picks_what_whole_rows_pick(settings):
    """The candidates path (one kernel pass per row, penalties re-ranked on the raw top k + |window| and the window's
    tokens) draws the same tokens as penalizing and sorting whole rows, for the same random streams, over many steps
    whose histories repeat tokens; the log-probabilities it hands steps_of agree with logsumexp's."""
    _kernels()
    from slmkit.engine.decode import steps_of
    from slmkit.engine.sampling import candidates, make_generator, sample_rows

    params = [SamplingParams(**settings)] * 4
    g = torch.Generator().manual_seed(7)
    histories = [[int(t) for t in torch.randint(0, 60, (30,), generator=g)] for _ in params]  # tokens the rows favour
    gens_a = [make_generator(10 + r) for r in range(4)]
    gens_b = [make_generator(10 + r) for r in range(4)]
    for _ in range(25):
        logits = torch.randn(4, 2000, generator=g) * 3
        logits[:, :60] += 2.5  # the window's tokens are among the best: the penalties decide the ranking
        cands = candidates(logits, params, histories)
        assert cands is not None
        want = sample_rows(logits, params, histories, gens_a)
        got = sample_rows(logits, params, histories, gens_b, cands)
        assert got == want
        a, b = steps_of(logits, got, [2] * 4), steps_of(logits, got, [2] * 4, cands)
        assert all(abs(x.logprob - y.logprob) < 1e-5 and [t for t, _ in x.top] == [t for t, _ in y.top] for x, y in zip(a, b))
        for h, t in zip(histories, got):
            h.append(t)


def test_candidates_step_aside_where_whole_rows_are_needed():
    """No candidates for a grammar, a row without top-k, scores that are not finite, or too wide a top-k: those rows
    take the whole-row path (which fails a non-finite row alone)."""
    _kernels()
    from slmkit.engine.sampling import candidates

    logits = torch.randn(2, 4000)
    ok = [SamplingParams(temperature=0.7)] * 2
    assert candidates(logits, ok, [[1], [2]]) is not None
    assert candidates(logits, [ok[0], SamplingParams(temperature=0.7, top_k=0)], [[1], [2]]) is None
    assert candidates(logits, [SamplingParams(temperature=0.7, top_k=3000)] * 2, [[1], [2]]) is None
    assert candidates(logits.double(), ok, [[1], [2]]) is None
    bad = logits.clone()
    bad[1, 3] = float("nan")
    assert candidates(bad, ok, [[1], [2]]) is None
