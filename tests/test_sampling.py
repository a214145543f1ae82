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
