"""The built-in tasks against lm-evaluation-harness's own task code, item by item: the same rows (in each Hub
dataset's schema, written here) read by both, and every context, continuation and gold index compared.
lm-eval reads the rows through its task YAML with `dataset_path: json`; no model and no download is involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit.evaluate.tasks import build_items, fewshot_rows, load_task, read_rows

lm_eval_tasks = pytest.importorskip("lm_eval.tasks", reason="lm-eval is in the test extra: pip install -e '.[test]'")
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval_tasks.__file__).parent

HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "label": "3", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                               "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye your hair [title] Buy dye.",
     "ctx_b": "[step] pick a  colour that suits you.", "label": "0",
     "endings": ["[substeps] Ask a friend  [title] Test it first.", " Paint the wall.", "Swim [step] away.", "Dance."]},
]
PIQA = [{"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
         "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.", "label": 0},
        {"goal": "dresser", "sol1": "can hold a hat", "sol2": "can hold a house", "label": 1}]
WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.", "option1": "Sarah",
     "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.", "option1": "trophy",
     "option2": "suitcase", "answer": "1"},
    {"sentence": "He poured water from the jug into the glass until _ was full.", "option1": "the jug", "option2": "the glass", "answer": "2"},
]
ARC = [
    {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect?",
     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter.",
                          "Planetary gravity will become stronger."], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "NYSEDREGENTS_2015_4_8", "question": "Which of these is a mammal?",
     "choices": {"text": ["frog", "whale", "shark"], "label": ["1", "2", "3"]}, "answerKey": "2"},
]
OPENBOOKQA = [
    {"id": "7-980", "question_stem": "The sun is responsible for",
     "choices": {"text": ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
                          "plants sprouting, blooming and wilting"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    {"id": "7-584", "question_stem": "When standing miles away from Mount Rushmore",
     "choices": {"text": ["the mountains seem very close", "the mountains are boring", "the mountains look the same as from up close",
                          "the mountains seem smaller than in photographs"], "label": ["A", "B", "C", "D"]}, "answerKey": " D"},
]
BOOLQ = [
    {"question": "do iran and afghanistan speak the same language", "passage": "Persian language -- Persian is a Western Iranian language.",
     "idx": 0, "label": 1},
    {"question": "is the sun a planet", "passage": "The Sun is the star at the center of the Solar System.", "idx": 1, "label": 0},
]
SCIQ = [
    {"question": "What type of organism is commonly used in preparation of foods such as cheese and yogurt?",
     "distractor3": "viruses", "distractor1": "protozoa", "distractor2": "gymnosperms", "correct_answer": "mesophilic organisms",
     "support": "  Mesophiles grow best in moderate temperature.\n"},
    {"question": "What is the least dangerous radioactive decay?", "distractor3": "zeta decay", "distractor1": "beta decay",
     "distractor2": "gamma decay", "correct_answer": "alpha decay", "support": ""},
]
LAMBADA = [
    {"text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. "
             "\"Figured if you're going to be out at night getting hit by cars, you might as well have some backup.\" "
             "I look at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin"},
    {"text": "Give me a minute to change and I'll meet you at the docks.\" She'd forced those words through her teeth."
             "\n\"No need to change. We won't be that long.\" Shane gripped her arm and started leading her to the dock"},
]


def _mmlu_rows(subject: str, n: int, tag: str) -> list[dict]:
    return [{"question": f" {tag} question {i} about {subject}? ", "subject": subject,
             "choices": [f"{tag}{i} one", f"{tag}{i} two", f"{tag}{i} three", f"{tag}{i} four"], "answer": i % 4} for i in range(n)]


MMLU_SUBJECTS = ("anatomy", "high_school_us_history")
MMLU_TEST = [r for s in MMLU_SUBJECTS for r in _mmlu_rows(s, 3, "t")]
# dev rows of both subjects interleaved: the few-shot examples must be each subject's own first five, in order
MMLU_DEV = [r for pair in zip(_mmlu_rows(MMLU_SUBJECTS[0], 6, "d"), _mmlu_rows(MMLU_SUBJECTS[1], 6, "e")) for r in pair]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_eval_requests(yaml_path: str, files: dict[str, Path], num_fewshot: int = 0) -> list[tuple[list[tuple[str, str]], object]]:
    """(arguments of every request, gold) for each doc, as lm-eval's task code builds them."""
    cfg = load_yaml(LM_EVAL_TASKS / yaml_path)
    splits = {k: cfg.get(k) for k in ("training_split", "validation_split", "test_split")}
    cfg.update({k: (v if v in files else None) for k, v in splits.items()})
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()}})
    task = ConfigurableTask(config=cfg)
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    out = []
    for i, doc in enumerate(docs):
        ctx = task.fewshot_context(doc, num_fewshot)
        reqs = task.construct_requests(doc, ctx, metadata=("t", i, 0))
        reqs = reqs if isinstance(reqs, list) else [reqs]
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        out.append(([tuple(r.arguments) for r in reqs], gold))
    return out


def ours(task: str, data_dir: Path) -> list:
    spec = load_task(task)
    return build_items(spec, read_rows(spec, data_dir=data_dir), None, fewshot_rows(spec, data_dir=data_dir))


CASES = [
    ("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/validation.jsonl", "validation", HELLASWAG),
    ("piqa", "piqa/piqa.yaml", "piqa/validation.jsonl", "validation", PIQA),
    ("winogrande", "winogrande/default.yaml", "winogrande/validation.jsonl", "validation", WINOGRANDE),
    ("arc_easy", "arc/arc_easy.yaml", "arc/arc_easy_test.jsonl", "test", ARC),
    ("arc_challenge", "arc/arc_challenge.yaml", "arc/arc_challenge_test.jsonl", "test", ARC),
    ("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/test.jsonl", "test", OPENBOOKQA),
    ("boolq", "super_glue/boolq/default.yaml", "boolq/validation.jsonl", "validation", BOOLQ),
    ("sciq", "sciq/sciq.yaml", "sciq/test.jsonl", "test", SCIQ),
    ("lambada_openai", "lambada/lambada_openai.yaml", "lambada_openai/test.jsonl", "test", LAMBADA),
]


@pytest.fixture
def data_dir(tmp_path, home, monkeypatch):
    monkeypatch.delenv("SLMKIT_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "data"


@pytest.mark.parametrize("task, yaml_path, rel, split, rows", CASES, ids=[c[0] for c in CASES])
def test_items_equal_lm_eval(task, yaml_path, rel, split, rows, data_dir):
    path = write_jsonl(data_dir / rel, rows)
    theirs = lm_eval_requests(yaml_path, {split: path})
    mine = ours(task, data_dir)
    assert len(mine) == len(theirs) == len(rows)
    for item, (args, gold) in zip(mine, theirs):
        assert list(zip(item.contexts, item.continuations)) == args
        if task != "lambada_openai":
            assert item.gold == gold


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_equals_lm_eval_per_subject(shots, data_dir):
    write_jsonl(data_dir / "mmlu" / "test.jsonl", MMLU_TEST)
    write_jsonl(data_dir / "mmlu" / "dev.jsonl", MMLU_DEV)
    mine = ours("mmlu_5shot" if shots else "mmlu", data_dir)
    assert [i.group for i in mine] == [r["subject"] for r in MMLU_TEST]
    for subject in MMLU_SUBJECTS:
        test = write_jsonl(data_dir / "lm" / f"{subject}_test.jsonl", [r for r in MMLU_TEST if r["subject"] == subject])
        dev = write_jsonl(data_dir / "lm" / f"{subject}_dev.jsonl", [r for r in MMLU_DEV if r["subject"] == subject])
        theirs = lm_eval_requests(f"mmlu/default/mmlu_{subject}.yaml", {"test": test, "dev": dev}, num_fewshot=shots)
        one = ours(f"mmlu_{subject}_5shot" if shots else f"mmlu_{subject}", data_dir)
        assert [(i.contexts, i.continuations, i.gold) for i in one] == \
               [(i.contexts, i.continuations, i.gold) for i in mine if i.group == subject]
        for item, (args, gold) in zip(one, theirs):
            assert list(zip(item.contexts, item.continuations)) == args and item.gold == gold
        if shots:  # the subject's own first five dev rows, none of the other subject's
            own, other = ("d", "e") if subject == MMLU_SUBJECTS[0] else ("e", "d")
            ctx = one[0].contexts[0]
            assert f"{own}4 one" in ctx and f"{own}5 one" not in ctx and f"{other}0 one" not in ctx


def test_llm_foundry_arc_layout_reads_the_same_as_the_hub_schema(data_dir):
    hub = write_jsonl(data_dir / "arc" / "arc_easy_test.jsonl", ARC)
    from_hub = ours("arc_easy", data_dir)
    foundry = [{"query": f"Question: {r['question']}", "choices": r["choices"]["text"],
                "gold": r["choices"]["label"].index(r["answerKey"])} for r in ARC]
    write_jsonl(hub, foundry)
    assert [(i.contexts, i.continuations, i.gold) for i in ours("arc_easy", data_dir)] == \
           [(i.contexts, i.continuations, i.gold) for i in from_hub]
