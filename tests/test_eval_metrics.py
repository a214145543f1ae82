"""Pure evaluation math."""

from __future__ import annotations

import math
import statistics

import pytest

from slmkit.evaluate.batching import plan_batches
from slmkit.evaluate.metrics import (
    argmax, bits_per_byte, choice_correct, mean_stderr, pareto_front, perplexity_from_nll, sliding_windows,
)


def test_mean_stderr_matches_sample_stdev():
    xs = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    assert mean_stderr(xs) == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)))
    assert math.isnan(mean_stderr([1.0]))


def test_choice_correct_acc_and_norm():
    # choice 0 has the higher total, choice 1 the higher per-character log-likelihood
    assert choice_correct([-4.0, -6.0], [2, 6], gold=1) == (0.0, 1.0)
    assert choice_correct([-4.0, -6.0], [2, 6], gold=0) == (1.0, 0.0)
    assert argmax([1.0, 3.0, 3.0]) == 1  # first on ties


@pytest.mark.parametrize("n, ctx, stride", [(10, 4, 2), (100, 16, 8), (17, 16, 15), (5, 64, 32), (2, 4, 1), (1000, 128, 1)])
def test_sliding_windows_score_every_position_once(n, ctx, stride):
    windows = sliding_windows(n, ctx, stride)
    scored = [p for _, e, s in windows for p in range(s, e)]
    assert scored == list(range(1, n))
    for b, e, s in windows:
        assert 0 < e - b <= ctx and b < s <= e
        if b > 0:
            assert s - b >= ctx - stride  # each scored token sees at least ctx - stride tokens of context


def test_sliding_windows_rejects_bad_settings():
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 4)
    with pytest.raises(ValueError):
        sliding_windows(10, 1, 1)


def test_ppl_and_bpb():
    assert perplexity_from_nll(2 * math.log(3), 2) == pytest.approx(3.0)
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)


def test_pareto_front():
    # (size, error): lower both better. (3, 3) is beaten by (2, 2)
    pts = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (4.0, 1.0)]
    assert pareto_front(pts, lower_x_better=True, lower_y_better=True) == [0, 1, 3]
    # (speed, accuracy): higher both better
    assert pareto_front([(10, 0.5), (20, 0.4), (5, 0.4)], lower_x_better=False, lower_y_better=False) == [0, 1]


def test_plan_batches_respects_budget_and_covers_all():
    lengths = [5, 50, 10, 50, 3, 20]
    batches = plan_batches(lengths, max_tokens=100, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 100


def test_short_labels_drop_the_shared_words():
    from slmkit.evaluate.report import short_labels

    names = ["smollm2-135m-instruct", "smollm2-135m-instruct-int8-rtn", "smollm2-135m-instruct (llamacpp)"]
    assert short_labels(names) == ("smollm2-135m-instruct", ["…", "…-int8-rtn", "… (llamacpp)"])
    assert short_labels(["m-7b", "m-8b"]) == ("m", ["…-7b", "…-8b"])
    assert short_labels(["tiny", "smollm2-135m"]) == ("", ["tiny", "smollm2-135m"])  # nothing shared
    assert short_labels(["only-one"]) == ("", ["only-one"])


def test_classification_report_matches_its_definitions():
    from slmkit.evaluate.metrics import classification_report

    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    r = classification_report(pred, gold)
    assert r["labels"] == ["a", "b", "c"] and r["accuracy"] == pytest.approx(4 / 6)
    pc = r["per_class"]
    assert pc["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert pc["b"]["precision"] == 0.5 and pc["b"]["recall"] == 0.5 and pc["c"]["precision"] == 0.5 and pc["c"]["recall"] == 1.0
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r["confusion"]["a"] == {"a": 2, "b": 1, "c": 0} and sum(map(sum, (row.values() for row in r["confusion"].values()))) == 6
    never = classification_report(["a", "a"], ["a", "b"], labels=["a", "b", "z"])  # a label never predicted or seen
    assert never["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert never["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # over the classes that occur (a, b), as scikit-learn
