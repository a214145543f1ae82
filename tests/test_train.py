"""The training core and distillation, on tiny random Llamas: data readers and masks, losses against their
definitions, the schedule, exact resume after a crash and after kill -9, the teacher cache, and the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CALIB_TEXT, build_tiny_llama, build_tokenizer
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.errors import SlmkitError
from slmkit.sources.importer import import_path
from slmkit.train import data as td
from slmkit.train.distill import distill_stage
from slmkit.train.loop import TrainConfig, fit, lr_at
from slmkit.train.losses import kd_loss, next_token_loss

runner = CliRunner()
DOCS = CALIB_TEXT.replace(". ", ".\n\n")


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text(DOCS)
    return p


@pytest.fixture
def pair(store, tmp_path_factory) -> tuple[str, str]:
    """A teacher and a student with the same tokenizer and different random weights."""
    import_path(build_tiny_llama(tmp_path_factory.mktemp("t") / "t", layers=4, intermediate=64), "teacher")
    import_path(build_tiny_llama(tmp_path_factory.mktemp("s") / "s", layers=2, intermediate=64, seed=1), "student")
    return "teacher", "student"


# ---- data ---------------------------------------------------------------------------------------------------------
def test_readers_take_the_usual_layouts(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    (tmp_path / "c.csv").write_text("q,a,x\nhow?,like this,1\n,empty,2\n")
    a = td.read_examples(tmp_path / "a.jsonl")
    assert a[0].text == "hello there" and a[1].messages == (("user", "hi"), ("assistant", "hello"))
    assert td.read_examples(tmp_path / "b.json")[0].messages == (("user", "Add\n\n1 and 2"), ("assistant", "3"))
    assert td.read_examples(tmp_path / "c.csv", prompt_column="q", response_column="a") == [
        td.Example(messages=(("user", "how?"), ("assistant", "like this")))]
    assert [e.text for e in td.read_examples(tmp_path / "c.csv", text_column="a")] == ["like this", "empty"]
    for path, kw, message in [
        (tmp_path / "c.csv", {}, "say which column"),
        (tmp_path / "c.csv", {"text_column": "nope"}, "no column 'nope'"),
        (tmp_path / "missing.txt", {}, "not found"),
    ]:
        with pytest.raises(SlmkitError, match=message):
            td.read_examples(path, **kw)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "x"}\n')
    with pytest.raises(SlmkitError, match=r"bad.jsonl:2: no 'text'"):
        td.read_examples(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n\n")
    with pytest.raises(SlmkitError, match="no usable rows"):
        td.read_examples(tmp_path / "empty.txt")


def test_chat_loss_mask_covers_the_assistant_turns_only():
    tok = build_tokenizer()
    ex = td.Example(messages=(("system", "Be brief."), ("user", "Where is Paris?"), ("assistant", "In France.")))
    ids, mask = td.encode_example(tok, ex)
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in ex.messages], tokenize=False)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "<|im_start|>assistant\nIn France.<|im_end|>\n"
    plain_ids, plain_mask = td.encode_example(tok, td.Example(text="Paris is big."))
    assert plain_ids[-1] == tok.eos_token_id and all(plain_mask)


def test_pack_and_split_are_deterministic(text_file):
    tok = build_tokenizer()
    train, valid, info = td.build(tok, [text_file], seq_len=16, valid_fraction=0.1, seed=3)
    assert train.ids.shape[1] == 17 and train.mask.shape == train.ids.shape and len(valid) >= 1
    again, _, info2 = td.build(tok, [text_file], seq_len=16, valid_fraction=0.1, seed=3)
    assert torch.equal(train.ids, again.ids) and info["sha256"] == info2["sha256"]
    other, _, info3 = td.build(tok, [text_file], seq_len=16, valid_fraction=0.1, seed=4)
    assert info3["sha256"] != info["sha256"]
    with pytest.raises(SlmkitError, match="less than one window"):
        td.pack([([1, 2, 3], [1, 1, 1])], 16)


# ---- losses and schedule -----------------------------------------------------------------------------------------
def test_losses_against_their_definitions():
    torch.manual_seed(0)
    v = 12
    s_logits, t_logits = torch.randn(2, 3, v), torch.randn(2, 3, v)
    t_logp = torch.log_softmax(t_logits, -1)
    ids = torch.arange(v).expand(2, 3, v)  # the full vocabulary as "top-k": the exact divergences
    mask = torch.ones(2, 3)
    p, q = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    fkl = (p * (p.log() - q.log())).sum(-1).mean()
    rkl = (q * (q.log() - p.log())).sum(-1).mean()
    m = 0.5 * p + 0.5 * q
    jsd = (0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)).mean()
    assert float(kd_loss("fkl", s_logits, t_logp, ids, mask)) == pytest.approx(float(fkl), rel=1e-5)
    assert float(kd_loss("rkl", s_logits, t_logp, ids, mask)) == pytest.approx(float(rkl), rel=1e-5)
    assert float(kd_loss("jsd", s_logits, t_logp, ids, mask)) == pytest.approx(float(jsd), rel=1e-5)
    for kind in ("fkl", "rkl", "jsd"):
        assert float(kd_loss(kind, t_logits, t_logp, ids, mask, tau=2.0)) == pytest.approx(0.0, abs=1e-6)
    targets = torch.randint(0, v, (2, 3))
    half = torch.tensor([[1, 0, 1], [0, 0, 1]])
    ce = -torch.log_softmax(s_logits, -1).gather(-1, targets[..., None])[..., 0]
    assert float(next_token_loss(s_logits, targets, half)) == pytest.approx(float((ce * half).sum() / 3), rel=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-4, rel=0.05)


# ---- the loop: exact resume ---------------------------------------------------------------------------------------
def _setup(tmp_path: Path, text_file: Path):
    folder = build_tiny_llama(tmp_path / "m", layers=2, intermediate=64)
    tok = build_tokenizer()
    train, valid, _ = td.build(tok, [text_file], seq_len=16, valid_fraction=0.1, seed=0)
    return folder, train, valid


def _loss(model, ids, mask, idx):
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    loss = next_token_loss(logits, ids[:, 1:], mask[:, 1:])
    return loss, {"loss": float(loss.detach())}


CFG = TrainConfig(steps=8, batch_size=2, grad_accum=2, lr=1e-3, checkpoint_every=2, eval_every=4)


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, text_file):
    folder, train, valid = _setup(tmp_path, text_file)
    whole = _model(folder)
    res = fit(whole, train, valid, CFG, tmp_path / "run-a", _loss)
    assert res["steps"] == 8 and res["val_after"] < res["val_before"]

    def crash(step: int) -> None:
        if step == 4:
            raise Crash

    broken = _model(folder)
    with pytest.raises(Crash):
        fit(broken, train, valid, CFG, tmp_path / "run-b", _loss, after_checkpoint=crash)
    with pytest.raises(SlmkitError, match="already holds a checkpoint"):
        fit(_model(folder), train, valid, CFG, tmp_path / "run-b", _loss)
    resumed = _model(folder)
    res_b = fit(resumed, train, valid, CFG, tmp_path / "run-b", _loss, resume=True)
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert [h["step"] for h in res_b["history"]] == list(range(1, 9))  # no step lost or repeated
    with pytest.raises(SlmkitError, match="other settings"):
        fit(_model(folder), train, valid, TrainConfig(steps=9, batch_size=2, grad_accum=2), tmp_path / "run-b", _loss, resume=True)
    with pytest.raises(SlmkitError, match="nothing to resume"):
        fit(_model(folder), train, valid, CFG, tmp_path / "run-c", _loss, resume=True)


KILLER = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_train as t
from slmkit.train.loop import fit
folder, train, valid = t._setup(Path({tmp!r}), Path({text!r}))
def die(step):
    if step == 6:
        os.kill(os.getpid(), 9)
fit(t._model(folder), train, valid, t.CFG, Path({run!r}), t._loss, after_checkpoint=die)
"""


def test_resume_after_kill_9(tmp_path, text_file):
    script = KILLER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path / "k"), text=str(text_file), run=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    folder, train, valid = _setup(tmp_path / "k", text_file)
    resumed = _model(folder)
    fit(resumed, train, valid, CFG, tmp_path / "run", _loss, resume=True)
    whole = _model(folder)
    fit(whole, train, valid, CFG, tmp_path / "run-whole", _loss)
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


# ---- distillation --------------------------------------------------------------------------------------------------
def _kl_to_teacher(student: str, teacher: str, text: str) -> float:
    from slmkit.evaluate.divergence import divergence

    return divergence(slmkit.load(student), slmkit.load(teacher), text, context_length=32)["mean_kl"]


def test_distillation_moves_the_student_toward_the_teacher(pair, text_file):
    teacher, student = pair
    cfg = TrainConfig(steps=30, lr=3e-3, batch_size=4, eval_every=10, checkpoint_every=10)
    card = distill_stage(teacher, student, [text_file], seq_len=32, config=cfg, name="kd", tau=1.0, alpha=1.0)
    s = card.settings
    assert card.stage == "distill" and card.parent == student and s["teacher"] == teacher and s["steps"] == 30
    assert s["teacher_cache"]["computed"] and s["teacher_cache"]["bytes_per_token"] == 32 * (2 + 4)
    assert _kl_to_teacher("kd", teacher, DOCS[:3000]) < 0.7 * _kl_to_teacher(student, teacher, DOCS[:3000])
    again = distill_stage(teacher, student, [text_file], seq_len=32, config=TrainConfig(steps=2), name="kd2", loss="jsd")
    assert not again.settings["teacher_cache"]["computed"]  # same teacher and data: the cache is reused
    plain = distill_stage(teacher, student, [text_file], seq_len=32, config=TrainConfig(steps=2), name="ce", alpha=0.0)
    assert plain.stage == "train" and plain.settings["teacher_cache"] is None
    assert slmkit.load("kd").generate("The quick", max_tokens=3, temperature=0) is not None
    # the loss curve: beside the weights, and in compare's report from the card
    from slmkit.store import Store

    assert (Store().path("kd") / "training.png").read_bytes()[:4] == b"\x89PNG"
    curve = s["loss_curve"]
    assert len(curve) == 30 and curve[-1]["loss"] < curve[0]["loss"] and sum("val_loss" in h for h in curve) == 3
    from slmkit.evaluate.report import write_html

    report = write_html([{"model": {"name": "kd", "card": card.__dict__}, "results": {}, "settings": {}}], Store().root.parent / "r.html", [])
    assert "<h2>Training</h2>" in report.read_text()


def test_distill_bad_input(pair, text_file, tmp_path):
    teacher, student = pair
    import_path(build_tiny_llama(tmp_path / "other", vocab_size=300), "othertok")
    before = sorted(p.name for p in slmkit.Store().root.iterdir())
    for kwargs, message in [
        ({"teacher": "othertok", "student": student}, "different tokenizers"),
        ({"teacher": teacher, "student": student, "data": []}, "no training data"),
        ({"teacher": teacher, "student": student, "data": [tmp_path / "nope.txt"]}, "not found"),
        ({"teacher": teacher, "student": student, "loss": "l2"}, "unknown loss"),
        ({"teacher": teacher, "student": student, "alpha": 2.0}, "--alpha"),
    ]:
        args = {"data": [text_file], **kwargs}
        with pytest.raises(SlmkitError, match=message):
            distill_stage(args.pop("teacher"), args.pop("student"), args.pop("data"), seq_len=32, config=TrainConfig(steps=1), **args)
    assert sorted(p.name for p in slmkit.Store().root.iterdir()) == before
    r = runner.invoke(app, ["distill", "--teacher", teacher, "--student", student, "--data", str(text_file), "--seq-len", "32",
                            "--steps", "3", "--name", "cli-kd"])
    assert r.exit_code == 0, r.output
    assert "made cli-kd: 3 steps" in r.stdout and "validation perplexity" in r.stdout
    r = runner.invoke(app, ["distill", "--teacher", "othertok", "--student", student, "--data", str(text_file)])
    assert r.exit_code == 1 and "different tokenizers" in r.stderr


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
import test_train as t
from slmkit.train.loop import TrainConfig, fit
from safetensors.torch import save_model
folder, train, valid = t._setup(Path({tmp!r}), Path({text!r}))
model = t._model(folder)
res = fit(model, train, valid, TrainConfig(steps=4, batch_size={batch}, lr=1e-3, checkpoint_every=100, eval_every=100), Path({run!r}), t._loss)
if res["world"] == 1 or torch.distributed.get_rank() == 0:
    save_model(model, {out!r})
    print("WORLD", res["world"])
"""


def test_two_processes_agree_with_one(tmp_path, text_file):
    """The same loop under torchrun (2 CPU processes; accelerate picks gloo and DDP) gives the one-process result:
    each process takes half of every step's windows and the gradients are averaged."""
    from safetensors.torch import load_file

    def script(batch: int, run: str, out: str) -> str:
        return DDP_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path / "d"), text=str(text_file), batch=batch,
                                 run=str(tmp_path / run), out=str(tmp_path / out))

    (tmp_path / "one.py").write_text(script(4, "run1", "one.safetensors"))
    (tmp_path / "two.py").write_text(script(2, "run2", "two.safetensors"))
    one = subprocess.run([sys.executable, str(tmp_path / "one.py")], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and "WORLD 1" in one.stdout, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(29500 + os.getpid() % 1000), str(tmp_path / "two.py")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0 and "WORLD 2" in two.stdout, (two.stdout[-1000:], two.stderr[-3000:])
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_fresh_student_from_a_config_and_teacher_written_data(pair, text_file):
    teacher, _ = pair
    card = distill_stage(teacher, "new:layers=2,intermediate=32", [text_file], seq_len=32, name="fresh",
                         config=TrainConfig(steps=3, batch_size=2), synthetic=4, synthetic_max_tokens=8)
    s = card.settings
    assert card.parent == teacher and s["student_init"]["config"]["layers"] == 2
    assert s["student_init"]["block_sources"] == {0: 0, 1: 3}
    net = slmkit.load("fresh").backend.model
    t_net = slmkit.load(teacher).backend.model
    assert net.config.num_hidden_layers == 2 and net.config.intermediate_size == 32
    # everything but the narrower MLP projections (3 per block) matched the teacher's shapes and was copied
    assert s["student_init"]["copied_tensors"] == s["student_init"]["tensors"] - 2 * 3
    rows = [json.loads(x) for x in Path(s["synthetic"]["file"]).read_text().splitlines()]
    assert len(rows) == 4 and all(r["text"] for r in rows) and s["synthetic"]["samples"] == 4
    assert s["data"]["files"][-1].endswith("synthetic.jsonl")
    assert t_net.config.num_hidden_layers == 4
    from slmkit.train.student import parse_spec

    for bad in ("new:", "new:layers=0", "new:depth=3"):
        with pytest.raises(SlmkitError):
            parse_spec(bad)


def test_hidden_state_alignment(pair, text_file):
    teacher, student = pair
    cfg = TrainConfig(steps=12, lr=3e-3, batch_size=4, eval_every=6, checkpoint_every=6)
    card = distill_stage(teacher, student, [text_file], seq_len=32, config=cfg, name="kd-hidden", hidden_weight=1.0)
    curve = card.settings["loss_curve"]
    assert card.settings["hidden_weight"] == 1.0 and all("hidden" in h for h in curve)
    assert sum(h["hidden"] for h in curve[-3:]) < sum(h["hidden"] for h in curve[:3])  # the states move toward the teacher's
    with pytest.raises(SlmkitError, match="hidden size"):
        distill_stage(teacher, "new:layers=1,hidden=16,heads=2,kv_heads=1,intermediate=16", [text_file], seq_len=32,
                      config=TrainConfig(steps=1), name="kd-bad", hidden_weight=1.0)


def test_chunked_cross_entropy_equals_the_full_one_with_its_gradients(tiny_dir):
    """The fine-tuning loss without (B, T, V) logits: same value and same gradients as the plain loss, through a
    peft-wrapped model, with a chunk that does not divide the positions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slmkit.train.losses import chunked_next_token_loss, next_token_loss

    torch.manual_seed(0)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = torch.randint(5, 300, (3, 20)), torch.rand(3, 20) > 0.3
    full = next_token_loss(net(input_ids=ids[:, :-1]).logits, ids[:, 1:], mask[:, 1:])
    full.backward()
    want = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad()
    out = net(input_ids=ids[:, :-1], output_hidden_states=True, logits_to_keep=1)
    assert out.logits.shape[1] == 1  # the full logits were never made
    chunked = chunked_next_token_loss(out.hidden_states[-1], net.get_output_embeddings(), ids[:, 1:], mask[:, 1:], chunk=7)
    chunked.backward()
    got = [p.grad for p in net.parameters() if p.requires_grad]
    assert abs(float(chunked) - float(full)) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_stratified_split_is_deterministic_balanced_and_leak_free(tmp_path):
    """slmkit data split: every label on both sides in its proportion, the same split for the same seed, no held-out
    text in training (a duplicate row is dropped from training), TSV read with a text and a label column."""
    import csv as csv_module

    from slmkit.train.data import label_of, prompt_of, read_examples, stratified_folds, stratified_split

    tsv = tmp_path / "rows.tsv"
    with tsv.open("w", newline="", encoding="utf-8") as f:
        w = csv_module.writer(f, delimiter="\t")
        w.writerow(["text", "label"])
        for i in range(40):
            w.writerow([f"message {i} about {'refunds' if i % 4 else 'orders'}", "refund" if i % 4 else "order"])
        w.writerow(["message 1 about refunds", "refund"])  # the same text twice
    examples = read_examples(tsv, prompt_column="text", response_column="label")
    assert len(examples) == 41 and label_of(examples[0]) == "order"
    train, held, dropped = stratified_split(examples, 0.2, seed=0)
    counts = lambda rows: {lab: sum(label_of(e) == lab for e in rows) for lab in ("order", "refund")}  # noqa: E731
    assert counts(held) == {"order": 2, "refund": 6}  # round(0.2 x 10), round(0.2 x 31)
    assert not {prompt_of(e) for e in train} & {prompt_of(e) for e in held}
    assert len(train) + len(held) + dropped == 41
    assert stratified_split(examples, 0.2, seed=0)[1] == held and stratified_split(examples, 0.2, seed=1)[1] != held
    r = runner.invoke(app, ["data", "split", str(tsv), "--out", str(tmp_path / "split"), "--text-column", "text", "--label-column", "label"])
    assert r.exit_code == 0 and "8 held out" in r.stdout and "2 labels" in r.stdout, r.output
    back = lambda f: read_examples(f, label_column="label")  # noqa: E731  (rows written as {text, label})
    assert back(tmp_path / "split" / "heldout.jsonl") == held and back(tmp_path / "split" / "train.jsonl") == train
    r = runner.invoke(app, ["data", "split", str(tsv), "--out", str(tmp_path / "x"), "--text-column", "text"])
    assert r.exit_code == 1 and "--text-column needs --label-column" in r.stderr
    folds = stratified_folds(examples, 5, seed=0)  # cross-validation: every row held out once, labels balanced
    assert sorted(len(h) for _, h, _ in folds) == [8, 8, 8, 8, 9]
    assert sorted(id(e) for _, h, _ in folds for e in h) == sorted(id(e) for e in examples)
    assert all(counts(h)["order"] == 2 for _, h, _ in folds)
    assert all(not {prompt_of(e) for e in t} & {prompt_of(e) for e in h} for t, h, _ in folds)
    r = runner.invoke(app, ["data", "split", str(tsv), "--out", str(tmp_path / "cv"), "--folds", "5", "--text-column", "text", "--label-column", "label"])
    assert r.exit_code == 0 and back(tmp_path / "cv" / "fold-3" / "heldout.jsonl") == folds[2][1], r.output
    r = runner.invoke(app, ["data", "split", str(tsv), "--out", str(tmp_path / "x"), "--held-out", "1.5", "--text-column", "text", "--label-column", "label"])
    assert r.exit_code == 1 and "between 0 and 1" in r.stderr


def test_a_teacher_behind_an_endpoint_writes_the_data_the_student_learns(store, tmp_path):
    """A black-box teacher: a second slmkit server (OpenAI API) answers prompts from the data; the answers are kept
    in the run (a stopped run goes on after them, asking only for the rest), and the student learns them."""
    from test_serve import Running

    from slmkit.sources.endpoint import TargetUnavailable

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about fox {i}."},
                                                        {"role": "assistant", "content": "ok"}]}) + "\n" for i in range(6)))
    s = Running(["tiny"], max_tokens_limit=16)
    try:
        url = s.url + "/v1"
        answers = Path(os.environ["SLMKIT_HOME"]) / "runs" / "student" / "teacher-answers.jsonl"
        answers.parent.mkdir(parents=True)
        answers.write_text(json.dumps({"messages": [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "from before"}]}) + "\n")
        before = s.metrics.requests.labels("chat", "tiny", "200")._value.get()
        card = distill_stage(url, "tiny", [prompts], synthetic=4, synthetic_max_tokens=6, name="student", seq_len=32,
                             config=TrainConfig(steps=2, batch_size=1))
        assert s.metrics.requests.labels("chat", "tiny", "200")._value.get() - before == 3  # one answer was there already
        rows = [json.loads(x) for x in answers.read_text().splitlines()]
        assert len(rows) == 4 and rows[0]["messages"][0]["content"] == "kept"
        assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["content"].startswith("Tell me about fox") for r in rows[1:])
        st = card.settings
        assert st["teacher"] == url and st["teacher_model"] == "tiny" and st["alpha"] == 0.0 and st["loss"] == "next-token"
        assert st["synthetic"]["samples"] == 4 and st["synthetic"]["reused"] == 1 and card.parent == "tiny"
        with pytest.raises(SlmkitError, match="answers only"):
            distill_stage(url, "new:layers=1", [prompts], name="fresh")
    finally:
        s.stop()
    with pytest.raises(TargetUnavailable, match="does not answer"):
        distill_stage(url, "tiny", [prompts], name="gone")
