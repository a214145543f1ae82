"""`slmkit ngram` (#33): the whitebox n-gram student read off a teacher, as a store model. The tree walk's
distributions are the teacher's own at each branch, the model is a store model like any other (ARPA file, card,
run, the decode loop equal to scoring the text, a static batch, serve), and bad settings say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, top_logprobs=2)
TEXT = ("The quick brown fox jumps over the lazy dog. Small models run fast on a laptop. "
        "Paris is the capital of France. Berlin is the capital of Germany.\n\n") * 60


@pytest.fixture
def domain(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text(TEXT)
    return path


def test_the_walk_reads_the_teachers_own_distribution_at_every_branch(store):
    """Branches share one KV cache through tree attention: each branch node's recorded distribution is what the
    teacher gives that path read from scratch."""
    from slmkit.engine import ngram_ops as ng
    from slmkit.sources.hf_dir import load_float
    from slmkit.train.ngram import Walk, _teacher_walk

    teacher, tok = load_float(store.require("tiny"), dtype=torch.float32)
    x = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital")[:16]])
    walk = Walk(window=16, top=4, min_p=0.0, branch=2, depth=2, threshold=1e-4, budget=10_000)
    bits = ng.bits_for(teacher.config.vocab_size)
    keys, p, read = _teacher_walk(teacher, x, 2, walk, bits, None, lambda n: None)
    assert read["branch_nodes"] > 16 and read["teacher_tokens"] == 16 + read["branch_nodes"]
    seen: dict[int, list[float]] = {}
    for k, q in zip(keys.tolist(), p.tolist()):
        seen.setdefault(k, []).append(q)
    recorded = lambda key, q: any(abs(x - q) < 1e-5 for x in seen.get(int(key), []))  # noqa: E731
    ids = x[0].tolist()
    with torch.inference_mode():
        first = torch.softmax(teacher(input_ids=x).logits[0, 5], -1).topk(2).indices.tolist()
        for a in [t for t in first if t != ids[6]][:1]:  # a depth-1 branch off position 5, then its own branch
            path = ids[:6] + [a]
            probs = torch.softmax(teacher(input_ids=torch.tensor([path])).logits[0, -1], -1)
            top_p, top_i = probs.topk(4)
            for q, w in zip(top_p.tolist(), top_i.tolist()):
                assert recorded((a << bits) | w, q)
            b = top_i[0]
            probs2 = torch.softmax(teacher(input_ids=torch.tensor([path + [b]])).logits[0, -1], -1)
            q2, w2 = probs2.max(-1)
            assert recorded((b << bits) | int(w2), float(q2))


def test_an_ngram_model_is_a_store_model(store, domain):
    from slmkit.engine.ngram_backend import NgramBackend
    from slmkit.loading import load

    run = lambda *a: CliRunner().invoke(app, list(a))  # noqa: E731
    r = run("ngram", "--teacher", "tiny", "--data", str(domain), "--name", "ng", "--budget", "2000", "--threshold", "0.01",
            "--max-entries", "2500")
    assert r.exit_code == 0, r.output
    assert "3-gram model" in r.output and "tokens read by the teacher" in r.output
    card = store.card("ng")
    s = card.settings
    assert card.stage == "ngram" and card.parent == "tiny" and s["source"] == "text and teacher" and s["branch_nodes"] > 0
    # the teacher's weight beside the text: the one of those tried that held-out text liked best
    tried = {float(w): p for w, p in s["held_out_by_weight"].items()}
    assert set(tried) == {0.0, 0.1, 0.3, 1.0} and s["teacher_weight"] == min(tried, key=tried.get)
    assert s["held_out_perplexity"] == tried[s["teacher_weight"]]
    assert 2000 <= s["teacher_tokens"] <= 2000 + 128 and s["held_out_perplexity"] > 1
    assert sum(s["entries"]) == card.parameters and sum(s["entries"]) < 2500 * 1.5  # pruned to about the size asked
    arpa = (store.require("ng") / "model.arpa").read_text()
    assert arpa.startswith("\\data\\\nngram 1=320\n") and "\\3-grams:" in arpa
    r = run("models", "show", "ng")
    assert r.exit_code == 0 and "Top contexts" in r.output, r.output

    b = load("ng").backend
    assert isinstance(b, NgramBackend) and b.vocab_size == 320
    prompt = b.encode("Paris is the capital of")
    steps = list(b.stream_steps(prompt, GREEDY, 8))
    ids = prompt + [st.token for st in steps]
    rows = b.logprob_rows(ids)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(len(ids) - 1), atol=1e-4)
    for i, st in enumerate(steps):  # the decode loop's log-probabilities are the whole-text scoring's
        assert abs(float(rows[len(prompt) - 1 + i][st.token]) - st.logprob) < 1e-4
    batch = b.generate_batch([prompt, b.encode("The quick")], GREEDY, 8, stop_at_eos=False)
    assert [st.token for st in batch[0]] == [st.token for st in steps][: len(batch[0])]
    scores = b.score_batch([(ids, len(prompt))])[0]
    assert [round(x, 4) for x in scores] == [round(st.logprob, 4) for st in steps]
    r = run("run", "ng", "Paris is the", "--max-tokens", "4", "--temperature", "0")
    assert r.exit_code == 0, r.output
    r = run("run", "ng", "Paris", "--backend", "llamacpp")
    assert r.exit_code == 1 and "n-gram model" in r.output


def test_the_classic_model_of_the_text_and_the_whitebox_differ(store, domain):
    from slmkit.loading import load
    from slmkit.train.ngram import Walk, ngram_stage

    text = ngram_stage("tiny", [domain], name="counted", from_text=True)
    read = ngram_stage("tiny", [domain], name="read", teacher_only=True, walk=Walk(budget=1000, depth=1, threshold=0.01))
    assert text.settings["source"] == "text" and "walk" not in text.settings and read.settings["source"] == "teacher"
    # the text repeats itself: counted from it, the next token of held-out text is all but certain
    assert text.settings["held_out_perplexity"] < 1.5 < read.settings["held_out_perplexity"]
    a, b = load("counted").backend, load("read").backend
    ids = a.encode("Paris is the capital of France.")
    assert float((a.logprob_rows(ids) - b.logprob_rows(ids)).abs().max()) > 0.1


def test_ngram_refuses_bad_settings_with_what_to_do(store, domain):
    run = lambda *a: CliRunner().invoke(app, ["ngram", "--teacher", "tiny", "--data", str(domain), *a])  # noqa: E731
    r = run("--name", "x", "--order", "9")
    assert r.exit_code == 1 and "allows orders 1 to 6" in r.output
    r = run("--name", "x", "--threshold", "0")
    assert r.exit_code == 1 and "--threshold in (0, 1]" in r.output
    r = run("--name", "x", "--teacher-weight", "2")
    assert r.exit_code == 1 and "(0, 1]" in r.output
    r = run("--name", "x", "--from-text", "--teacher-only")
    assert r.exit_code == 1 and "exclude each other" in r.output
    r = run("--name", "x", "--max-entries", "0")
    assert r.exit_code == 1 and "positive number" in r.output
    assert not (store.root / "x").exists()


def test_the_domain_gate_keeps_branches_of_the_domain(store, domain, tmp_path):
    from slmkit.train.ngram import Walk, ngram_stage

    general = tmp_path / "general.txt"
    general.write_text("def add(a, b):\n    return a + b\n" * 200)
    walk = Walk(budget=1000, depth=1, threshold=0.005)
    free = ngram_stage("tiny", [domain], name="free", walk=walk).settings["branch_nodes"]
    gated = ngram_stage("tiny", [domain], name="gated", walk=walk, general=general).settings["branch_nodes"]
    assert 0 < gated < free
    cached = list((store.root.parent / "cache" / "ngram").glob("walk-*.npz"))
    assert len(cached) == 2  # one reading of the teacher per walk; a third model of the same reading reuses it
    again = ngram_stage("tiny", [domain], name="smaller", walk=walk, max_entries=2000).settings
    assert again["branch_nodes"] == free and len(list((store.root.parent / "cache" / "ngram").glob("walk-*.npz"))) == 2
    assert np.isfinite(free)


def test_an_ngram_model_is_served_with_rows_batched_like_one_at_a_time(store, domain):
    import concurrent.futures

    from test_serve import Running, client

    from slmkit.train.ngram import Walk, ngram_stage

    ngram_stage("tiny", [domain], name="ng", walk=Walk(budget=600, depth=1, threshold=0.01))
    s = Running(["ng"], max_tokens_limit=40)
    try:
        c = client(s)
        ask = lambda t: c.completions.create(model="ng", prompt=t, max_tokens=6, temperature=0).choices[0].text  # noqa: E731
        prompts = ("The quick brown", "Small models run", "Paris is the capital of")
        alone = [ask(t) for t in prompts]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # rows of one batch, joining and leaving it
            together = list(pool.map(ask, prompts))
        assert together == alone and sum(bool(a) for a in alone) >= 2, alone
    finally:
        s.stop()
