"""Evaluation on tiny random models, checked against independent computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_llama, snapshot
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.errors import SlmkitError
from slmkit.evaluate.choice import evaluate_task
from slmkit.engine.scoring import encode_pair
from slmkit.evaluate.divergence import divergence
from slmkit.evaluate.perplexity import perplexity
from slmkit.evaluate.speed import measure_speed
from slmkit.evaluate.tasks import load_task, read_rows
from slmkit.sources.importer import import_path

TEXT = (
    "The quick brown fox jumps over the lazy dog. Small language models run on laptops, offline and private. "
    "Paris is the capital of France. Berlin is the capital of Germany. "
) * 3

runner = CliRunner()


@pytest.fixture
def tiny(store):
    return slmkit.load("tiny")


def write_task(tmp_path, rows, fmt="query_choices_gold", extra="", name="t"):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\ndata: {data.name}\nformat: {fmt}\nprompt: \"{{query}}\\nAnswer:\"\n{extra}")
    return spec


ARC_ROWS = [
    {"query": "Question: What is the capital of France?", "choices": ["Paris", "Berlin", "the lazy dog"], "gold": 0},
    {"query": "Question: Which animal is quick?", "choices": ["fox", "dog"], "gold": 0},
    {"query": "Question: Where do models run?", "choices": ["on laptops", "in Germany", "offline"], "gold": 2},
    {"query": "Question: Berlin is the capital of?", "choices": ["France", "Germany"], "gold": 1},
]


def test_task_accuracy_matches_independent_scoring(tiny, tmp_path):
    spec = write_task(tmp_path, ARC_ROWS)
    res = evaluate_task(tiny, str(spec))
    accs, norms = [], []
    for row in ARC_ROWS:
        ctx = row["query"] + "\nAnswer:"
        lls = [tiny.score(" " + c, context=ctx).total for c in row["choices"]]
        accs.append(float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == row["gold"]))
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        norms.append(float(max(range(len(normed)), key=lambda i: (normed[i], -i)) == row["gold"]))
    assert res["n"] == 4 and res["acc"] == pytest.approx(sum(accs) / 4) and res["acc_norm"] == pytest.approx(sum(norms) / 4)
    assert res["acc_stderr"] >= 0 or math.isnan(res["acc_stderr"])
    assert evaluate_task(tiny, str(spec), limit=2)["n"] == 2


def test_other_formats(tiny, tmp_path):
    hs = write_task(tmp_path, [{"query": "The fox", "endings": [" jumps.", " sleeps."], "label": 0}] * 3, "hellaswag", name="hs")
    assert evaluate_task(tiny, str(hs))["n"] == 3
    labels = tmp_path / "piqa-labels.lst"
    labels.write_text("1\n0\n")
    piqa = write_task(
        tmp_path, [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it"}] * 2, "piqa",
        extra=f"labels: {labels.name}\nfewshot: 1\n", name="piqa",
    )
    piqa.write_text(piqa.read_text().replace("{query}", "Question: {goal}"))
    res = evaluate_task(tiny, str(piqa))
    assert res["n"] == 2 and res["fewshot"] == 1
    wg = write_task(
        tmp_path, [{"context_options": ["Paris is in France", "Paris is in Germany"], "continuation": " and it is big.", "gold": 0}],
        "winogrande", name="wg",
    )
    res = evaluate_task(tiny, str(wg))
    a = tiny.score(" and it is big.", context="Paris is in France").total
    b = tiny.score(" and it is big.", context="Paris is in Germany").total
    assert res["acc"] == float(a >= b)


@pytest.mark.parametrize(
    "rows, fmt, message",
    [
        ([ARC_ROWS[0], "{not json"], "query_choices_gold", ":2: not valid JSON"),
        ([ARC_ROWS[0], {"query": "q", "choices": ["a", "b"]}], "query_choices_gold", ":2: missing field 'gold'"),
        ([{"query": "q", "choices": ["a", "b"], "gold": 5}], "query_choices_gold", ":1: gold/label 5 is out of range"),
        ([{"query": "q", "choices": "ab", "gold": 0}], "query_choices_gold", ":1: field 'choices' should be list"),
        ([{"query": "q", "label": 0}], "hellaswag", ":1: missing field 'choices'"),  # neither the Hub's nor a processed row
        ([{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}], "winogrande", ":1: the sentence has no blank"),
        ([ARC_ROWS[0]], "multiple_guess", "unknown format 'multiple_guess'"),
    ],
)
def test_bad_task_files_say_which_line_and_why(tmp_path, rows, fmt, message):
    spec = write_task(tmp_path, rows, fmt)
    with pytest.raises(SlmkitError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        read_rows(load_task(str(spec)))
    assert e.value.hint


def test_piqa_needs_matching_labels(tmp_path):
    labels = tmp_path / "l.lst"
    labels.write_text("0\n")
    spec = write_task(tmp_path, [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2, "piqa", extra=f"labels: {labels.name}\n")
    with pytest.raises(SlmkitError, match="no label for this row"):
        read_rows(load_task(str(spec)))


def test_unknown_task_lists_builtins():
    with pytest.raises(SlmkitError) as e:
        load_task("no_such_task")
    assert "arc_easy" in e.value.hint


def test_perplexity_matches_a_plain_transformers_loop(tiny):
    res = perplexity(tiny, TEXT, context_length=32, stride=16)
    model, b = tiny.backend.model, tiny.backend
    ids = [min(b.eos_token_ids)] + b.encode(TEXT)  # prefix token, then the text
    nll, count, prev_end = 0.0, 0, 1
    with torch.no_grad():  # windows of 32 tokens, each scoring the next 16 (the last one reaching back 32), one by one
        while prev_end < len(ids):
            end = min(32 if prev_end == 1 else prev_end + 16, len(ids))
            begin = max(0, end - 32)
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].float(), -1)
            for pos in range(prev_end, end):
                nll -= float(logp[pos - begin - 1, ids[pos]])
                count += 1
            prev_end = end
    assert res["tokens"] == count == len(ids) - 1
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-4)
    assert res["complete"]
    part = perplexity(tiny, TEXT, context_length=32, stride=16, limit=2)
    assert part["windows"] == 2 and not part["complete"] and part["tokens"] == 31 + 16


def test_kl_zero_against_itself_and_positive_against_another(tiny, tmp_path):
    same = divergence(tiny, tiny, TEXT, context_length=32)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    import_path(build_tiny_llama(tmp_path / "other", seed=1), "other")
    other = divergence(tiny, slmkit.load("other"), TEXT, context_length=32)
    assert other["mean_kl"] > 0.01 and other["tokens"] == same["tokens"]


def test_kl_refuses_a_different_tokenizer(tiny, tmp_path):
    import_path(build_tiny_llama(tmp_path / "othertok", vocab_size=300), "othertok")
    with pytest.raises(SlmkitError, match="different tokenizers") as e:
        divergence(tiny, slmkit.load("othertok"), TEXT)
    assert "bits per byte" in e.value.hint


def test_speed_reports_numbers(tiny):
    s = measure_speed(tiny, prompt_tokens=16, new_tokens=4, batch=2, repeats=1)
    assert s["prompt_tokens"] == 16 and s["prefill_tokens_per_s"] > 0 and s["batched_tokens_per_s"] > 0
    assert s["peak_rss_mb"] > 10 and s["parameters"] == tiny.card.parameters


def test_batched_generation_matches_single(tiny):
    b = tiny.backend
    prompts = [b.encode("The quick brown"), b.encode("Paris is the capital of France and")]
    params = slmkit.SamplingParams(temperature=0, repetition_penalty=1.0)
    params_lp = slmkit.SamplingParams(temperature=0, repetition_penalty=1.0, top_logprobs=3)
    batched = b.generate_batch(prompts, params_lp, 6, stop_at_eos=False)
    for p, out in zip(prompts, batched):
        single = b.generate_batch([p], params, 6, stop_at_eos=False)[0]
        assert [s.token for s in out] == [s.token for s in single]
        # the static batch's log-probabilities are the one-sequence loop's (left padding changes nothing)
        alone = list(b.stream_steps(p, params_lp, 6))
        assert [s.token for s in alone] == [s.token for s in out]
        for a, s in zip(alone, out):
            assert abs(a.logprob - s.logprob) < 1e-3 and len(s.top) == 3 and s.top[0][0] == s.token
            assert max(abs(x[1] - y[1]) for x, y in zip(a.top, s.top)) < 1e-3


def test_eval_and_compare_cli(store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    spec = write_task(tmp_path, ARC_ROWS)
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", "tiny", "--ppl", str(text), "--task", str(spec), "--speed", "--limit", "2",
                            "--context-length", "32", "--stride", "16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["schema"] == "slmkit.eval/1" and res["model"]["name"] == "tiny"
    assert res["model"]["card"]["stage"] == "import" and res["environment"]["torch"]
    assert set(res["results"]) == {"perplexity", "tasks", "speed"} and res["results"]["tasks"]["t"]["n"] == 2
    r2 = runner.invoke(app, ["eval", "--ppl", str(text), "--context-length", "32", "--limit", "1"])  # the default
    assert r2.exit_code == 0, r2.output
    html = tmp_path / "report.html"
    r = runner.invoke(app, ["compare", str(out), "smollm2-135m-instruct", "--html", str(html)])
    assert r.exit_code == 0, r.output
    page = html.read_text()
    assert "data:image/png;base64," in page and "Pareto" in page and "tiny" in page and "smollm2-135m-instruct" in page
    assert "bits/byte" in r.stdout


def test_eval_cli_errors(store, tmp_path):
    bad = write_task(tmp_path, [ARC_ROWS[0], "{oops"])
    for args, message in [
        (["eval", "tiny"], "nothing to measure"),
        (["eval", "tiny", "--task", "nope"], "no task named 'nope'"),
        (["eval", "tiny", "--task", str(bad)], ":2: not valid JSON"),
        (["eval", "tiny", "--ppl", str(tmp_path / "missing.txt")], "no such text file"),
        (["compare", "never-evaluated"], "neither a results file"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)


def write_dataset(folder, rel, rows):
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lambada_accuracy_is_greedy_match_and_perplexity_per_item(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("SLMKIT_DATA", raising=False)
    b = tiny.backend
    rows = [{"text": "The quick brown fox jumps over the lazy dog."},
            {"text": "Paris is the capital of France."},
            {"text": "Small language models run on laptops"}]
    # one more row whose last word is what the model itself predicts, so a greedy hit is possible
    ctx_ids = b.encode("Berlin is the capital of")
    nxt = int(b.logprob_rows(ctx_ids + [0])[-1].argmax())
    rows.append({"text": "Berlin is the capital of" + b.decode([nxt])})
    data = tmp_path / "data"
    write_dataset(data, "lambada_openai/test.jsonl", rows)
    res = evaluate_task(tiny, "lambada_openai", data_dir=data)
    greedy, lls = [], []
    for row in rows:
        words = row["text"].split(" ")
        ctx, cont = " ".join(words[:-1]), " " + words[-1]
        s = tiny.score(cont, context=ctx)
        lls.append(s.total)
        ids, start = encode_pair(b, ctx, cont)
        rows_lp = b.logprob_rows(ids)[start - 1:]  # predictions for ids[start:]
        greedy.append(float(all(int(rows_lp[i].argmax()) == ids[start + i] for i in range(len(ids) - start))))
    assert res["n"] == 4 and res["acc"] == pytest.approx(sum(greedy) / 4)
    assert res["perplexity"] == pytest.approx(math.exp(-sum(lls) / 4), rel=1e-5)
    assert "acc_norm" not in res


MMLU_ROWS = [{"question": f"Where is {c}?", "subject": s, "choices": ["France", "Germany", "a dog", "laptops"], "answer": a}
             for s, c, a in [("geography", "Paris", 0), ("geography", "Berlin", 1), ("geography", "the fox", 2),
                             ("computer_science", "a model", 3), ("computer_science", "the code", 3)]]


def test_mmlu_suite_reports_subjects_and_the_average(store, tmp_path, monkeypatch):
    from slmkit.evaluate.run import evaluate

    monkeypatch.delenv("SLMKIT_DATA", raising=False)
    data = tmp_path / "data"
    write_dataset(data, "mmlu/test.jsonl", MMLU_ROWS)
    write_dataset(data, "mmlu/dev.jsonl", MMLU_ROWS[:2] + MMLU_ROWS[3:4])
    result, _ = evaluate(slmkit.load("tiny"), suites=["mmlu"], data_dir=data)
    r = result["results"]
    zero, five = r["tasks"]["mmlu"], r["tasks"]["mmlu_5shot"]
    assert zero["n"] == five["n"] == 5 and set(zero["groups"]) == {"geography", "computer_science"}
    g = zero["groups"]
    assert g["geography"]["n"] == 3 and g["computer_science"]["n"] == 2
    # lm-eval's MMLU average weights subjects by size: the same as the accuracy over all questions
    assert zero["acc"] == pytest.approx((3 * g["geography"]["acc"] + 2 * g["computer_science"]["acc"]) / 5)
    suite = r["suites"]["mmlu"]
    assert suite["average"] == pytest.approx((zero["acc"] + five["acc"]) / 2)
    assert suite["tasks"]["mmlu"] == {"metric": "acc", "value": zero["acc"], "n": 5}
    res = runner.invoke(app, ["eval", "tiny", "--suite", "nope"])
    assert res.exit_code == 1 and "Suites: small" in res.stderr


def test_missing_dataset_is_a_clear_cli_error(store, monkeypatch):
    monkeypatch.delenv("SLMKIT_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(store.root.parent)
    res = runner.invoke(app, ["eval", "tiny", "--task", "hellaswag"])
    assert res.exit_code == 1
    assert "hellaswag/validation.jsonl" in res.stderr and "slmkit data fetch hellaswag" in res.stderr
    assert snapshot(store.root.parent) == before


def test_compare_baseline_stderr_noise_and_json(store, tmp_path):
    spec = write_task(tmp_path, ARC_ROWS)
    outs = []
    for name in ("tiny", "smollm2-135m-instruct"):
        f = tmp_path / f"{name}.json"
        r = runner.invoke(app, ["eval", name, "--task", str(spec), "--json", "--out", str(f)])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["results"]["tasks"]["t"]["n"] == len(ARC_ROWS)  # --json: the results on stdout
        outs.append(str(f))
    html = tmp_path / "c.html"
    r = runner.invoke(app, ["compare", *outs, "--baseline", "tiny", "--html", str(html)])
    assert r.exit_code == 0, r.output
    assert "±" in r.stdout and f"(n={len(ARC_ROWS)})" in r.stdout and "(baseline)" in r.stdout
    assert "within two standard errors" in r.stdout  # a handful of questions cannot tell models apart
    page = html.read_text()
    assert "±" in page and "within two standard errors" in page and "(baseline)" in page
    r = runner.invoke(app, ["compare", *outs, "--json", "--html", str(html)])
    rows = json.loads(r.stdout)["rows"]
    assert r.exit_code == 0 and [row["model"] for row in rows] == ["tiny", "smollm2-135m-instruct"] and "t.acc_stderr" in rows[0]
    r = runner.invoke(app, ["compare", *outs, "--baseline", "nope"])
    assert r.exit_code == 1 and "not among the compared models" in r.output
