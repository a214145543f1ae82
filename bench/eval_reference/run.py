"""Check slmkit eval against references on the default model, in one run:

1. Every built-in task whose data is at hand (ARC-Easy and ARC-Challenge always: they ship inside slmkit; the
   others when a data folder holds them): slmkit's score vs lm-evaluation-harness running its *own* task config
   for that task on the same rows (target: within 0.5 points).
2. WikiText-2 perplexity: slmkit vs a plain transformers loop written here (target: within 1%).

Needs the test or dev extra (lm-eval). Run:
    .venv/bin/python bench/eval_reference/run.py [--limit 500] [--ppl-chars 60000] [--data-dir DATA]
Writes bench/results/eval_reference.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE.parent / "results"

# slmkit task -> (lm-eval task config inside lm_eval/tasks, the split lm-eval scores, metrics to compare)
LM_EVAL = {
    "arc_easy": ("arc/arc_easy.yaml", "test", ("acc", "acc_norm")),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", ("acc", "acc_norm")),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", ("acc", "acc_norm")),
    "piqa": ("piqa/piqa.yaml", "validation", ("acc", "acc_norm")),
    "winogrande": ("winogrande/default.yaml", "validation", ("acc",)),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", ("acc", "acc_norm")),
    "boolq": ("super_glue/boolq/default.yaml", "validation", ("acc",)),
    "sciq": ("sciq/sciq.yaml", "test", ("acc", "acc_norm")),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test", ("acc", "perplexity")),
}


def plain_transformers_ppl(model, tokenizer, text: str, ctx: int, stride: int) -> tuple[float, int]:
    """The windowing of the transformers perplexity guide, with an EOS prefix token so every token is scored."""
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    nll, count, prev_end = 0.0, 0, 1
    with torch.inference_mode():
        for begin in range(0, len(ids), stride):
            end = min(begin + ctx, len(ids))
            x = torch.tensor([ids[begin:end]])
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            for pos in range(max(prev_end, begin + 1), end):
                nll -= float(logp[pos - begin - 1, ids[pos]])
                count += 1
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count), count


def hub_rows(task: str, path: Path, limit: int) -> list[dict]:
    """The first `limit` rows in the Hub's schema (the packaged ARC files are llm-foundry's {query, choices, gold})."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()][:limit]
    if task.startswith("arc") and rows and "query" in rows[0]:
        labels = "ABCDEFGH"
        rows = [{"question": r["query"].removeprefix("Question: "), "answerKey": labels[r["gold"]],
                 "choices": {"text": r["choices"], "label": list(labels[: len(r["choices"])])}} for r in rows]
    return rows


def lscpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return f"{model}; " + " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=500, help="questions per task")
    ap.add_argument("--ppl-chars", type=int, default=60000, help="characters of wiki.test.raw for the perplexity check")
    ap.add_argument("--data-dir", type=Path, default=None, help="a data folder with more tasks' files (slmkit data list)")
    args = ap.parse_args()

    import lm_eval
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    import slmkit
    from slmkit.data.locate import DataNotFound, locate
    from slmkit.evaluate.choice import evaluate_task
    from slmkit.evaluate.perplexity import perplexity, resolve_text
    from slmkit.evaluate.tasks import load_task
    from slmkit.store import Store

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    model = slmkit.load()
    folder = Store().path(model.name)
    lm_tasks_dir = Path(lm_eval.tasks.__file__).parent
    work = Path(tempfile.mkdtemp(prefix="slmkit-eval-ref-"))

    tasks: dict[str, dict] = {}
    for name, (config, split, metrics) in LM_EVAL.items():
        spec = load_task(name)
        try:
            path = locate(spec.dataset, spec.split, data_dir=args.data_dir, hub=False)
        except DataNotFound:
            print(f"{name}: no data at hand, skipped", flush=True)
            continue
        rows = hub_rows(name, path, args.limit)
        local = work / f"{name}.jsonl"
        local.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / f"ref_{name}.yaml").write_text(
            f"include: {lm_tasks_dir / config}\ntask: ref_{name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {local}\ntraining_split: null\n"
            f"validation_split: {split if split == 'validation' else 'null'}\ntest_split: {split if split == 'test' else 'null'}\n")
        t = time.perf_counter()
        ours = evaluate_task(model, name, limit=args.limit, data_dir=args.data_dir)
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        ref = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[f"ref_{name}"],
            task_manager=TaskManager(include_path=str(work)), batch_size=16, device="cpu",
        )["results"][f"ref_{name}"]
        ref_s = time.perf_counter() - t
        entry = {"questions": ours["n"], "slmkit_seconds": ours_s, "lm_eval_seconds": ref_s, "metrics": {}}
        for m in metrics:
            a, b = ours[m], ref[f"{m},none"]
            diff = abs(a - b) if m == "perplexity" else 100 * abs(a - b)
            entry["metrics"][m] = {"slmkit": a, "lm_eval": b, "diff": diff, "unit": "%" if m == "perplexity" else "points"}
            if m == "perplexity":
                entry["metrics"][m]["diff"] = 100 * abs(a - b) / b
        tasks[name] = entry
        print(json.dumps({name: entry}), flush=True)

    text = resolve_text("wikitext2").read_text(encoding="utf-8")[: args.ppl_chars]
    t = time.perf_counter()
    ours_ppl = perplexity(model, text, context_length=1024, stride=512)
    ours_ppl_s = time.perf_counter() - t
    b = model.backend
    ref_ppl, ref_count = plain_transformers_ppl(b.model, b.tokenizer, text, 1024, 512)

    result = {
        "benchmark": "eval_reference",
        "model": model.name,
        "cpu": lscpu_flags(),
        "platform": platform.platform(),
        "lm_eval_version": getattr(lm_eval, "__version__", "?"),
        "tasks": tasks,
        "perplexity": {
            "text": f"wiki.test.raw, first {args.ppl_chars} characters",
            "slmkit": {"perplexity": ours_ppl["perplexity"], "tokens": ours_ppl["tokens"],
                       "bits_per_byte": ours_ppl["bits_per_byte"], "seconds": ours_ppl_s},
            "plain_transformers": {"perplexity": ref_ppl, "tokens": ref_count},
            "rel_diff": abs(ours_ppl["perplexity"] - ref_ppl) / ref_ppl,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_reference.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# eval_reference ({model.name})", "",
             f"lm-evaluation-harness {result['lm_eval_version']} runs its own task config for each task on the same rows "
             f"(first {args.limit} of each split); CPU: {result['cpu']}.", "",
             "| task | metric | n | slmkit | lm-eval | difference | target |", "|---|---|---|---|---|---|---|"]
    for name, e in tasks.items():
        for m, v in e["metrics"].items():
            unit = v["unit"]
            lines.append(f"| {name} | {m} | {e['questions']} | {v['slmkit']:.4f} | {v['lm_eval']:.4f} | "
                         f"{v['diff']:.2f} {unit} | <= {'1 %' if unit == '%' else '0.5 points'} |")
    p = result["perplexity"]
    lines += ["", "| check | slmkit | plain transformers loop | difference | target |", "|---|---|---|---|---|",
              f"| WikiText-2 ppl ({p['slmkit']['tokens']} tokens) | {p['slmkit']['perplexity']:.4f} | "
              f"{p['plain_transformers']['perplexity']:.4f} | {100 * p['rel_diff']:.3f}% | <= 1% |", "",
              "Time (same machine, same run): " + ", ".join(
                  f"{n} slmkit {e['slmkit_seconds']:.0f} s / lm-eval {e['lm_eval_seconds']:.0f} s" for n, e in tasks.items()), ""]
    (RESULTS / "eval_reference.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
