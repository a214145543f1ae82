"""A mixture of specialists by total probability (#33): the arithmetic (distributions sum to one, one specialist is
itself, Bayes recovers the domain that wrote the text, the mixture's loss is within log D of the best specialist's),
and the mixture as a store model: `slmkit mix`, run, stream, batch, serve, with the incremental engine path equal to
scoring the whole text."""

from __future__ import annotations

import math

import httpx

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_llama

from slmkit.cli import app
from slmkit.engine import mixture_ops as mo
from slmkit.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, top_logprobs=2)


def test_the_mixture_is_a_distribution_and_bayes_finds_the_domain():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 3, 50), -1)  # (T, D, V)
    w = torch.log_softmax(torch.randn(5, 3), -1)  # (T, D)
    assert torch.allclose(mo.mixed(w, lp).exp().sum(-1), torch.ones(5))
    one = mo.log_prior(None, 1)
    assert torch.allclose(mo.mixed(one.expand(5, 1), lp[:, :1]), lp[:, 0])  # one specialist: itself
    # text drawn from specialist 1: its weight goes to ~1 under exact Bayes; with a fixed share it stays off the floor
    prior = mo.log_prior([0.6, 0.3, 0.1], 3)
    gen = torch.Generator().manual_seed(1)
    dists = torch.log_softmax(torch.randn(200, 3, 50, generator=gen) * 2, -1)
    tokens = torch.multinomial(dists[:, 1].exp(), 1, generator=gen).squeeze(-1)  # (T,)
    lls = dists[torch.arange(200), :, tokens]  # (T, D)
    bayes = mo.weights_along(lls, prior, 0.0)
    assert torch.allclose(bayes[0], prior) and bayes[-1].exp()[1] > 0.999
    shared = mo.weights_along(lls, prior, 0.05)
    assert shared[-1].exp()[1] > 0.8 and float(shared.exp().min()) >= 0.05 * 0.1 * 0.999
    assert torch.allclose(shared.exp().sum(-1), torch.ones(200, dtype=torch.float64))
    # the Bayes mixture's total log-loss is within log(1 / prior of the best) of the best specialist's
    mix_loss = -float(mo.mixed(bayes, dists).gather(-1, tokens[:, None]).sum())
    best = min(-float(lls[:, d].sum()) for d in range(3))
    assert best - 1e-6 <= mix_loss + 1e-6 and mix_loss <= best + math.log(1 / 0.3) + 1e-6
    fixed = mo.weights_along(lls, prior, 1.0)  # share 1: a fixed mixture, the prior at every token
    assert torch.allclose(fixed, prior.expand(200, 3))
    with pytest.raises(ValueError, match="positive"):
        mo.log_prior([1.0, 0.0], 2)


@pytest.fixture
def specialists(store, tmp_path_factory):
    """'tiny' and 'other': two different tiny models with one tokenizer; 'mixed' mixes them."""
    from slmkit.route.mix import mix_stage
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path_factory.mktemp("other") / "other", seed=7), "other")
    mix_stage(["tiny", "other"], name="mixed", prior=[0.7, 0.3], share=0.02)
    return "tiny", "other"


def test_a_mixture_model_runs_and_its_engine_path_equals_scoring_the_text(specialists):
    from slmkit.engine.mixture import MixtureBackend
    from slmkit.loading import load

    m = load("mixed")
    b = m.backend
    assert isinstance(b, MixtureBackend) and b.names == ["tiny", "other"]
    prompt = b.encode("The quick brown fox jumps")
    steps = list(b.stream_steps(prompt, GREEDY, 8))
    ids = prompt + [s.token for s in steps]
    rows = b.logprob_rows(ids)  # (T-1, V): each position with the weights the text before it gave
    assert torch.allclose(rows.exp().sum(-1), torch.ones(len(ids) - 1), atol=1e-4)
    for i, s in enumerate(steps):  # the decode loop's log-probabilities are the whole-text scoring's
        row = rows[len(prompt) - 1 + i]
        assert abs(float(row[s.token]) - s.logprob) < 1e-3 and s.token == int(row.argmax())
    # the mixture is neither specialist, and its weights moved from the prior with the text
    alone = [load(n).backend.logprob_rows(ids) for n in specialists]
    assert all(float((rows - a).abs().max()) > 1e-3 for a in alone)
    w = b.weights(ids)
    assert set(w) == {"tiny", "other"} and abs(sum(w.values()) - 1) < 1e-9 and abs(w["tiny"] - 0.7) > 1e-3
    # a static batch of two prompts gives what each gets alone
    other_prompt = b.encode("Paris is the capital of")
    batch = b.generate_batch([prompt, other_prompt], GREEDY, 8, stop_at_eos=False)
    assert [s.token for s in batch[0]] == [s.token for s in steps][: len(batch[0])]
    assert [s.token for s in batch[1]] == [s.token for s in b.stream_steps(other_prompt, GREEDY, 8)][: len(batch[1])]
    # `run --verbose` says the weights after the answer
    r = CliRunner().invoke(app, ["run", "mixed", "The quick brown", "--max-tokens", "4", "--temperature", "0", "--verbose"])
    assert r.exit_code == 0 and "domain weights: tiny 0." in r.output, r.output
    # perplexity through eval's scorer
    scores = b.score_batch([(ids, len(prompt))])[0]
    assert [round(x, 4) for x in scores] == [round(s.logprob, 4) for s in steps] and scores.greedy


def test_a_mixture_is_served_with_rows_batched_like_one_at_a_time(specialists):
    from test_serve import Running, client

    s = Running(["mixed"], max_tokens_limit=40)
    try:
        c = client(s)
        ask = lambda t: c.completions.create(model="mixed", prompt=t, max_tokens=6, temperature=0).choices[0].text  # noqa: E731
        prompts = ("The quick brown", "Small models run", "Paris is the capital of")
        alone = [ask(t) for t in prompts]
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # rows of one batch, joining and leaving it
            together = list(pool.map(ask, prompts))
        assert together == alone and sum(bool(a) for a in alone) >= 2, alone
        # the domain weights after each answer, in the response's extension field
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "mixed", "messages": [{"role": "user", "content": "Paris is"}],
                                                             "max_tokens": 4, "temperature": 0}).json()
        w = r["slmkit"]["domain_weights"][0]
        assert set(w) == {"tiny", "other"} and abs(sum(w.values()) - 1) < 1e-9
    finally:
        s.stop()


def test_mix_refuses_what_it_cannot_mix(specialists, tmp_path):
    from slmkit.sources.importer import import_path

    run = lambda *a: CliRunner().invoke(app, ["mix", *a])  # noqa: E731
    r = run("tiny", "--name", "solo")
    assert r.exit_code == 1 and "two or more" in r.output
    r = run("tiny", "other", "--name", "m2", "--prior", "1,0")
    assert r.exit_code == 1 and "positive weights" in r.output
    r = run("tiny", "mixed", "--name", "m3")
    assert r.exit_code == 1 and "is a mixture" in r.output
    import_path(build_tiny_llama(tmp_path / "odd", vocab_size=300), "odd")
    r = run("tiny", "odd", "--name", "m4")
    assert r.exit_code == 1 and "different tokenizers" in r.output
    r = run("tiny", "other", "--name", "m5", "--share", "0", "--json")
    assert r.exit_code == 0, r.output


def test_a_mixture_whose_specialist_is_gone_says_which(specialists):
    import shutil

    from slmkit.errors import SlmkitError
    from slmkit.loading import load
    from slmkit.store import Store

    shutil.rmtree(Store().path("other"))
    with pytest.raises(SlmkitError, match="needs other, which the store no longer has"):
        load("mixed")


def test_lora_specialists_of_one_base_run_as_rows_of_one_batch(store, tmp_path):
    """Specialists that are LoRA adapters of one base mix in one batched forward over it (ids 1..D): the same
    distributions, answers and batches as each adapter run merged on its own."""
    import json

    from slmkit.engine.mixture import MixtureBackend
    from slmkit.loading import load
    from slmkit.route.mix import mix_stage
    from slmkit.train.finetune import finetune_stage
    from slmkit.train.loop import TrainConfig

    for name, text in (("a", "The quick brown fox jumps over the lazy dog. "), ("b", "Paris is the capital of France. ")):
        path = tmp_path / f"{name}.txt"
        path.write_text(text * 80)
        finetune_stage("tiny", [path], seq_len=32, config=TrainConfig(steps=3, batch_size=4, lr=5e-2), name=f"lora-{name}")
    mix_stage(["lora-a", "lora-b"], name="mixed-lora", prior=[0.6, 0.4], share=0.05)
    shared = load("mixed-lora").backend
    alone = MixtureBackend([load(n).backend for n in ("lora-a", "lora-b")], [0.6, 0.4], 0.05, names=["lora-a", "lora-b"])
    assert shared.shared is not None and alone.shared is None
    ids = shared.encode("The quick brown fox. Paris is the capital of")
    torch.testing.assert_close(shared.logprob_rows(ids), alone.logprob_rows(ids), atol=1e-4, rtol=1e-4)
    prompts = [shared.encode("The quick"), shared.encode("Paris is"), shared.encode("the lazy dog")]
    one = [[s.token for s in shared.stream_steps(p, GREEDY, 6)] for p in prompts]
    assert one == [[s.token for s in alone.stream_steps(p, GREEDY, 6)] for p in prompts]
    batch = shared.generate_batch(prompts, GREEDY, 6, stop_at_eos=False)
    assert [[s.token for s in row][: len(o)] for row, o in zip(batch, one)] == one
    store_ = shared.batch_store(3)  # rows leave and the others keep their weights and specialists
    for p in prompts:
        store_.prefill(p, 0, None, export=False)
        store_.join()
    store_.step([one[0][0], one[1][0], one[2][0]])
    assert store_.keep([0, 2]) == [0, 2] and store_.kv.slots.rows == 4
    assert json.dumps(shared.weights(ids)) and abs(sum(shared.weights(ids).values()) - 1) < 1e-9
