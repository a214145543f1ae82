"""Classification as a task: rows of a text and a label read from every layout (CSV/TSV, JSON lines, a saved Hugging
Face dataset), fine-tuned on the label alone (one row per window), answered with one of the labels, evaluated with
the classifier's own labels, and served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.errors import SlmkitError
from slmkit.train import data as td
from slmkit.train.finetune import finetune_stage
from slmkit.train.loop import TrainConfig

runner = CliRunner()
# a task the random model cannot do before training: the label follows from the text's first word
ROWS = [(f"{w} {t}", lab) for w, lab in (("apple", "fruit"), ("pear", "fruit"), ("oak", "tree"), ("pine", "tree"),
                                          ("red", "colour"), ("blue", "colour"))
        for t in ("is here", "was seen today", "grows near the house", "again")]


def _csv(path: Path, rows=ROWS, sep: str = ",") -> Path:
    path.write_text(f"sentence{sep}category\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in rows))
    return path


def test_readers_give_the_same_rows_from_every_layout(tmp_path):
    import datasets

    want = [td.Example(messages=(("user", t), ("assistant", lab))) for t, lab in ROWS]
    assert td.read_examples(_csv(tmp_path / "a.csv"), text_column="sentence", label_column="category") == want
    assert td.read_examples(_csv(tmp_path / "a.tsv", sep="\t"), text_column="sentence", label_column="category") == want
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    assert td.read_examples(tmp_path / "a.jsonl", label_column="label") == want
    (tmp_path / "a.json").write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS]))  # a JSON array
    assert td.read_examples(tmp_path / "a.json", label_column="label") == want
    names = sorted({lab for _, lab in ROWS})
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [names.index(lab) for _, lab in ROWS]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=names)}))
    ds.save_to_disk(str(tmp_path / "hf"))
    assert td.read_examples(tmp_path / "hf", label_column="label") == want  # class ids become their names
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hfd"))
    with pytest.raises(SlmkitError, match="several splits") as err:
        td.read_examples(tmp_path / "hfd", label_column="label")
    assert "hfd/test" in err.value.hint
    with pytest.raises(SlmkitError, match="no column 'category'"):
        td.read_examples(tmp_path / "hf", label_column="category")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": ""}) + "\n")
    with pytest.raises(SlmkitError, match="needs a text and a label"):
        td.read_examples(tmp_path / "bad.jsonl", label_column="label")


def test_rows_are_padded_one_per_window_and_learn_only_the_answer(tiny_dir):
    from slmkit.sources.hf_dir import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    ex = [td.Example(messages=(("user", t), ("assistant", lab))) for t, lab in ROWS[:5]]
    seqs = [td.encode_example(tok, e) for e in ex]
    w = td.pad_rows(seqs, 256, tok.eos_token_id)
    assert len(w) == 5 and w.ids.shape[1] == max(len(s) for s, _ in seqs)
    for row, (ids, mask) in enumerate(seqs):
        assert w.ids[row, : len(ids)].tolist() == ids and w.mask[row, len(ids):].sum() == 0
        learned = tok.decode([i for i, m in zip(ids, mask) if m])
        assert ex[row].messages[1][1] in learned and ex[row].messages[0][1] not in learned
    short = td.pad_rows(seqs, 4, tok.eos_token_id)  # too long: each keeps its end, where the answer is
    assert short.ids.shape[1] == 5 and short.ids[0].tolist() == seqs[0][0][-5:]
    plain_ids, plain_mask = td.encode_example(tok, ex[0], "plain")
    assert tok.decode(plain_ids).endswith("apple is here\nLabel: fruit" + tok.eos_token)
    assert tok.decode([i for i, m in zip(plain_ids, plain_mask) if m]).strip() == "fruit" + tok.eos_token


def test_shared_prefix_scoring_matches_scoring_each_row(wide):
    b = slmkit.load(wide).backend
    prefix = b.encode("The capital of France", add_special_tokens=True)
    conts = [b.encode(x, add_special_tokens=False) for x in (" is Paris", " Berlin", " is the city of lights")]
    shared = b.score_continuations(prefix, conts)
    each = b.score_batch([(prefix + c, len(prefix)) for c in conts])
    assert [len(s) for s in shared] == [len(c) for c in conts]
    assert all(s == pytest.approx(list(e), abs=1e-4) for s, e in zip(shared, each))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_classify_learns_the_labels_and_the_card_keeps_them(wide, tmp_path, method):
    data = _csv(tmp_path / "train.csv")
    base = slmkit.load(wide)
    labels = sorted({lab for _, lab in ROWS})
    before = sum(base.classify(t, labels).label == lab for t, lab in ROWS)
    lr = 1e-2 if method == "full" else 3e-2
    card = finetune_stage(wide, [data], method=method, task="classify", read={"text_column": "sentence", "label_column": "category"},
                          config=TrainConfig(steps=60, batch_size=8, lr=lr, seed=0), name=f"wide-cls-{method}")
    assert card.settings["classify"] == {"labels": labels, "prompt_format": "chat"}
    assert card.settings["data"]["train_windows"] + card.settings["data"]["valid_windows"] == len(ROWS)
    model = slmkit.load(card.name)
    got = [model.classify(t) for t, _ in ROWS]  # labels from the card
    after = sum(g.label == lab for g, (_, lab) in zip(got, ROWS))
    assert all(g.label in labels for g in got)
    if method == "full":  # (LoRA's few weights learn this random tiny model only partly)
        assert after == len(ROWS) > before and all(g.probabilities[g.label] > 0.5 for g in got)
    else:
        assert after >= len(ROWS) // 2 > before


def test_classify_cli_plain_format_on_a_base_model_then_eval_defaults_to_its_labels(store, tmp_path, tiny_base_dir):
    from slmkit.sources.importer import import_path

    import_path(tiny_base_dir, "base")  # no chat template: chat format is refused, plain works
    data = _csv(tmp_path / "train.csv")
    args = ["finetune", "base", "--data", str(data), "--task", "classify", "--text-column", "sentence", "--label-column",
            "category", "--method", "full", "--steps", "60", "--batch-size", "8", "--lr", "1e-2"]
    r = runner.invoke(app, args + ["--name", "base-cls-chat"])
    assert r.exit_code == 1 and "no chat template" in r.output and "--prompt-format plain" in r.output
    r = runner.invoke(app, args + ["--prompt-format", "plain", "--name", "base-cls"])
    assert r.exit_code == 0 and "a classifier over 3 labels (colour, fruit, tree)" in r.output, r.output
    r = runner.invoke(app, ["finetune", "base", "--data", str(data), "--task", "classify", "--text-column", "sentence"])
    assert r.exit_code == 1 and "--label-column" in r.output
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS[::3]))
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", "base-cls", "--responses", str(held), "--label-column", "label", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"]["responses"]
    assert res["metric"] == "accuracy" and res["prompt_format"] == "plain" and res["labels"] == ["colour", "fruit", "tree"]
    assert res["accuracy"] == 1.0 and res["classifications_per_s"] > 0
    held.write_text(json.dumps({"text": "a rose", "label": "flower"}) + "\n")
    r = runner.invoke(app, ["eval", "base-cls", "--responses", str(held), "--label-column", "label"])
    assert r.exit_code == 1 and "outside the label set: flower" in r.output


def test_a_classifier_is_served_with_its_labels(wide, tmp_path):
    """/v1/classify answers with the classifier's labels (the library's answer and probabilities), any model with the
    labels a request names; /v1/models lists a classifier's labels and a response_format that holds a chat answer
    to them (json_schema enum)."""
    import httpx
    from openai import OpenAI

    from test_serve import Running

    finetune_stage(wide, [_csv(tmp_path / "train.csv")], method="full", task="classify",
                   read={"text_column": "sentence", "label_column": "category"},
                   config=TrainConfig(steps=60, batch_size=8, lr=1e-2, seed=0), name="wide-cls")
    want = slmkit.load("wide-cls")
    s = Running(["wide-cls", wide], max_tokens_limit=20)
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        entry = c.models.retrieve("wide-cls").model_extra
        assert entry["labels"] == ["colour", "fruit", "tree"] and entry["prompt_format"] == "chat"
        assert "labels" not in c.models.retrieve(wide).model_extra
        texts = [t for t, _ in ROWS[::4]]
        r = httpx.post(s.url + "/v1/classify", json={"model": "wide-cls", "input": texts})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["label"] for d in data] == [lab for _, lab in ROWS[::4]] == [want.classify(t).label for t in texts]
        assert all(d["probabilities"] == pytest.approx(want.classify(t).probabilities, abs=1e-4) for d, t in zip(data, texts))
        assert r.json()["usage"]["prompt_tokens"] == sum(want.classify(t).prompt_tokens for t in texts)
        answer = c.chat.completions.create(model="wide-cls", messages=[{"role": "user", "content": "oak again"}], max_tokens=10,
                                           temperature=1.0, response_format=entry["response_format"]).choices[0].message.content
        assert json.loads(answer) in entry["labels"]  # sampled, and still one of the labels
        r = httpx.post(s.url + "/v1/classify", json={"model": wide, "input": "apple"})
        assert r.status_code == 400 and "not a classifier" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/classify", json={"model": wide, "input": "apple", "labels": ["fruit", "tree"]})
        assert r.status_code == 200 and r.json()["data"][0]["label"] in ("fruit", "tree")
        for bad in ({"input": []}, {"input": ["ok", " "]}, {"input": ["x"] * 65}, {"input": "x", "labels": ["only"]}):
            r = httpx.post(s.url + "/v1/classify", json={"model": "wide-cls", **bad})
            assert r.status_code == 400, (bad, r.text)
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


@pytest.mark.parametrize("method", ["qlora", "prompt"])
def test_every_method_trains_a_classifier(wide, tmp_path, method):
    """QLoRA and prompt tuning train on the padded label rows too (prompt tuning's virtual tokens come first in
    every window); the result answers with its labels, and the loss on them fell."""
    card = finetune_stage(wide, [_csv(tmp_path / "train.csv")], method=method, task="classify", virtual_tokens=4,
                          read={"text_column": "sentence", "label_column": "category"},
                          config=TrainConfig(steps=20, batch_size=8, lr=3e-2, seed=0), name=f"wide-cls-{method}")
    assert card.settings["classify"]["labels"] == ["colour", "fruit", "tree"]
    curve = [p["loss"] for p in card.settings["loss_curve"]]
    assert curve[-1] < curve[0]
    model = slmkit.load(card.name)
    assert all(model.classify(t).label in ("colour", "fruit", "tree") for t, _ in ROWS[:4])
