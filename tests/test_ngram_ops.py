"""The n-gram model's arithmetic (engine/ngram_ops.py): fractional counts, the interpolated Kneser-Ney estimate,
its backoff form and ARPA files."""

from __future__ import annotations

import numpy as np
import pytest

from slmkit.engine import ngram_ops as ng

V = 50
BITS = ng.bits_for(V)


def _random_model(order: int = 3, seed: int = 0, soft: bool = True) -> tuple[list[ng.Level], list[ng.Counts]]:
    rng = np.random.default_rng(seed)
    text = rng.integers(0, V, size=(4000,))
    text[1::3] = text[::3][: len(text[1::3])] % 7  # some structure
    grams = np.stack([text[i: len(text) - order + 1 + i] for i in range(order)], axis=1)
    p = rng.uniform(0.05, 1.0, size=len(grams)) if soft else np.ones(len(grams))
    counts = ng.all_orders(ng.count_stats(ng.encode(grams, BITS), p), order, BITS)
    levels = [ng.estimate_level(c, k + 1, BITS, ng.closed_discounts(c)) for k, c in enumerate(counts)]
    return levels, counts


def test_count_distribution_of_fractional_observations():
    keys = np.array([7, 7, 7, 3], dtype=np.int64)
    p = np.array([0.5, 0.2, 1.0, 0.3])
    c = ng.count_stats(keys, p)
    assert c.keys.tolist() == [3, 7]
    assert c.expected.tolist() == pytest.approx([0.3, 1.7])
    # key 3: one event of probability 0.3
    assert c.dist[0].tolist() == pytest.approx([0.7, 0.3, 0, 0, 0, 0])
    # key 7: a sure event and two of 0.5 and 0.2: c = 1 + Bernoulli(.5) + Bernoulli(.2)
    assert c.dist[1].tolist() == pytest.approx([0, 0.4, 0.5, 0.1, 0, 0])
    assert c.dist.sum(1) == pytest.approx([1, 1])


def test_integer_counts_are_counted_exactly():
    keys = np.array([1] * 7 + [2] * 2, dtype=np.int64)
    c = ng.count_stats(keys, np.ones(9))
    assert c.expected.tolist() == [7, 2]
    assert c.dist[0].tolist() == [0, 0, 0, 0, 0, 1]  # 5+
    assert c.dist[1].tolist() == [0, 0, 1, 0, 0, 0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_every_context_normalizes(order):
    levels, _ = _random_model(order)
    model = ng.backoff_form(levels, V)
    rng = np.random.default_rng(1)
    for _ in range(20):
        hist = rng.integers(0, V, size=order - 1).tolist()
        total = np.exp(ng.dense_row(model, hist)).sum()
        assert total == pytest.approx(1.0, abs=1e-9)
    # a context never seen, and none at all
    assert np.exp(ng.dense_row(model, [])).sum() == pytest.approx(1.0, abs=1e-9)


def test_backoff_form_is_the_interpolated_model():
    levels, _ = _random_model(3)
    model = ng.backoff_form(levels, V)
    rng = np.random.default_rng(2)
    hist = rng.integers(0, V, size=(500, 2))
    hist[:20, 0] = -1  # the start of a text: a shorter history
    w = rng.integers(0, V, size=500)
    np.testing.assert_allclose(ng.logprob(model, hist, w), ng.interp_logprob(levels, V, BITS, hist, w), atol=1e-10)
    for h, t in zip(hist[:30].tolist(), w[:30].tolist()):
        assert ng.dense_row(model, [x for x in h if x >= 0])[t] == pytest.approx(ng.logprob(model, np.array([h]), np.array([t]))[0])


def test_soft_counts_recover_the_distribution_they_came_from():
    """Many visits of one context, each adding a known next-token distribution as fractional counts: the estimate
    returns that distribution (the discounts are small against such counts)."""
    target = np.array([0.5, 0.25, 0.15, 0.1])
    ctx = np.array([[11, 12]] * 4000)
    rows = []
    for t, q in enumerate(target):
        rows.append((ng.encode(np.c_[ctx, np.full(len(ctx), 20 + t)], BITS), np.full(len(ctx), q)))
    keys = np.concatenate([r[0] for r in rows])
    p = np.concatenate([r[1] for r in rows])
    counts = ng.all_orders(ng.count_stats(keys, p), 3, BITS)
    levels = [ng.estimate_level(c, k + 1, BITS, ng.closed_discounts(c)) for k, c in enumerate(counts)]
    row = np.exp(ng.dense_row(ng.backoff_form(levels, V), [11, 12]))
    assert row[20:24] == pytest.approx(target, abs=2e-3)


def test_discounts_fitted_on_held_out_text_do_not_lose_to_the_closed_form():
    levels, counts = _random_model(3, soft=False)
    rng = np.random.default_rng(3)
    text = rng.integers(0, V, size=1000)
    text[1::3] = text[::3][: len(text[1::3])] % 7
    hist, w = np.stack([text[:-2], text[1:-1]], 1), text[2:]
    closed = -ng.interp_logprob(levels, V, BITS, hist, w).mean()
    fitted = ng.fit_discounts(counts, V, BITS, hist, w)
    refit = [ng.estimate_level(c, k + 1, BITS, fitted[k]) for k, c in enumerate(counts)]
    assert -ng.interp_logprob(refit, V, BITS, hist, w).mean() <= closed + 1e-9


def test_pruning_keeps_the_model_normalized_and_smaller():
    _, counts = _random_model(3)
    keep = ng.prune_masks(counts, V, 600)
    assert sum(int(m.sum()) for m in keep[1:]) == 600 - V  # the most counted types above the unigrams, any order
    pruned = [ng.estimate_level(c, k + 1, BITS, ng.closed_discounts(c), keep[k]) for k, c in enumerate(counts)]
    full = [ng.estimate_level(c, k + 1, BITS, ng.closed_discounts(c)) for k, c in enumerate(counts)]
    small, big = ng.backoff_form(pruned, V), ng.backoff_form(full, V)
    assert small.entries < big.entries
    assert np.exp(ng.dense_row(small, [3, 4])).sum() == pytest.approx(1.0, abs=1e-9)


def test_arpa_round_trip(tmp_path):
    levels, _ = _random_model(3)
    model = ng.backoff_form(levels, V)
    path = tmp_path / "m.arpa"
    ng.write_arpa(model, path, lambda t: f"w{t}")
    text = path.read_text()
    assert text.startswith("\\data\\\nngram 1=50\n") and text.rstrip().endswith("\\end\\")
    back = ng.read_arpa(path, V, lambda s: int(s[1:]))
    assert [len(k) for k in back.keys] == [len(k) for k in model.keys]
    rng = np.random.default_rng(4)
    hist, w = rng.integers(0, V, size=(300, 2)), rng.integers(0, V, size=300)
    np.testing.assert_allclose(ng.logprob(back, hist, w), ng.logprob(model, hist, w), atol=1e-5)
