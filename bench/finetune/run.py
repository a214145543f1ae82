"""Fine-tuning benchmark on the customer-support set: the default model adapted by LoRA r=8 and r=16, QLoRA over an
int8 and an int4 base, prompt tuning (20 virtual tokens) and full fine-tuning, all on one fixed budget of steps and tokens.

QLoRA runs over int8 and int4 children made first by `slmkit quantize` (rtn). Training rows: the customer's message
-> the agent's response, and "Which intent is this? ..." -> the intent label.
Held out (never trained on, --heldout each, default 40): response rows (ROUGE-L F1 and response perplexity) and intent rows (exact-match
accuracy). Each run's peak memory is its process's maximum resident set; trainable parameters, wall time and
tokens/s come from the run's card. (That base + GGUF LoRA adapter in llama.cpp answers as the merged model and slmkit
do is checked in tests/test_finetune.py.)

    .venv/bin/python bench/finetune/run.py [--steps 60] [--rows 1200] [--data ../shared/data]

Writes bench/results/finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BASE, RESULTS, ROOT, cpu_line, exists, slmkit  # noqa: E402  (bench/common.py)

INTENT_PROMPT = "Which intent is this customer message? Answer with the label only.\n\n"
INTENT_NOTE = ("Intent accuracy here is the exact match of a generated answer after a budget that sees each intent row once at most: 0.000 for every method. Why: the label rows are ~3% of the learned tokens, mixed with long responses, over ~20% of an epoch of a file sorted by intent (the first 2,400 rows cover 15 of its 27 intents, the held-out rows others). Classification is measured as such in specialize.md: `finetune --task classify` (the loss on the label alone, one row per window) on a stratified split, answered with the likeliest label.")
INT8, INT4 = f"{BASE}-int8-rtn", f"{BASE}-int4-rtn"  # made by slmkit quantize: QLoRA loads them without a float copy
RUNS = [("lora-r8", BASE, ["--method", "lora", "--r", "8", "--alpha", "16"]),
        ("lora-r16", BASE, ["--method", "lora", "--r", "16", "--alpha", "32"]),
        ("qlora-int8", INT8, ["--method", "qlora"]),
        ("qlora-int4", INT4, ["--method", "qlora"]),
        ("prompt", BASE, ["--method", "prompt", "--virtual-tokens", "20"]),
        ("full", BASE, ["--method", "full"])]


def chat(prompt: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}) + "\n"


def make_data(data: Path, out: Path, rows: int, heldout: int = 40) -> tuple[Path, Path, Path]:
    with (data / "customer_support" / "bitext_customer_support_4514_responses.csv").open(encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    held = table[::25][: 2 * heldout]  # every 25th row, never trained on
    held_ids = {id(r) for r in held}
    train = [r for r in table if id(r) not in held_ids][:rows]
    out.mkdir(parents=True, exist_ok=True)
    t, resp, intents = out / "train.jsonl", out / "heldout-responses.jsonl", out / "heldout-intents.jsonl"
    t.write_text("".join(chat(r["instruction"], r["response"]) + chat(INTENT_PROMPT + r["instruction"], r["intent"]) for r in train))
    resp.write_text("".join(chat(r["instruction"], r["response"]) for r in held[:heldout]))
    intents.write_text("".join(chat(INTENT_PROMPT + r["instruction"], r["intent"]) for r in held[heldout:]))
    return t, resp, intents


def measure(name: str, env: dict[str, str], out: Path, resp: Path, intents: Path) -> dict:
    res = {}
    for tag, f, metric in (("responses", resp, "rouge_l"), ("intents", intents, "exact_match")):
        path = out / f"{name}-{tag}.json"
        if not path.is_file():
            slmkit(["eval", name, "--responses", str(f), "--metric", metric, "--out", str(path)], env)
        res[tag] = json.loads(path.read_text())["results"]["responses"]
    return {"rouge_l": res["responses"]["rouge_l"], "response_ppl": res["responses"]["response_perplexity"],
            "intent_acc": res["intents"]["exact_match"], "n_responses": res["responses"]["n"], "n_intents": res["intents"]["n"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rows", type=int, default=1200, help="training rows of the customer-support set")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--heldout", type=int, default=40, help="held-out rows for each of the two evaluations")
    ap.add_argument("--methods", nargs="+", default=[r[0] for r in RUNS], choices=[r[0] for r in RUNS])
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    env = dict(os.environ, SLMKIT_HOME=args.home)
    out = Path(args.home) / "bench-finetune"
    out = out / f"h{args.heldout}"
    train, resp, intents = make_data(args.data, out, args.rows, args.heldout)
    rows = [{"label": "base", "model": BASE, **measure(BASE, env, out, resp, intents)}]
    print(json.dumps(rows[-1]), flush=True)
    runs = [r for r in RUNS if r[0] in args.methods]
    for name, scheme in ((INT8, "int8"), (INT4, "int4")):
        if any(model == name for _, model, _ in runs) and not exists(name, env):
            slmkit(["quantize", BASE, "--scheme", scheme, "--name", name, "--no-ppl"], env)
    for label, model, extra in runs:
        name = f"{BASE}-cs-{label}-{args.steps}"
        peak_file = out / f"{name}-peak.json"  # kept beside the evaluations: a rerun reuses finished runs
        if not exists(name, env):
            _, peak = slmkit(["finetune", model, "--data", str(train), *extra, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                          "--batch-size", str(args.batch_size), "--eval-every", str(args.steps), "--grad-checkpoint", "--name", name], env)
            peak_file.write_text(json.dumps({"peak_rss_mb": peak}))
        peak = json.loads(peak_file.read_text())["peak_rss_mb"] if peak_file.is_file() else None
        card = json.loads(subprocess.run([sys.executable, "-m", "slmkit", "models", "show", name, "--json"], env=env,
                                         capture_output=True, text=True, check=True).stdout)
        s = card["settings"]
        rows.append({"label": label, "model": name, "trainable": s["trainable_parameters"], "trainable_share": s["trainable_share"],
                     "peak_rss_mb": peak, "seconds": s["seconds"], "tokens": s["tokens"], "tokens_per_s": s["tokens"] / s["seconds"],
                     **measure(name, env, out, resp, intents)})
        print(json.dumps(rows[-1]), flush=True)
    cpu = cpu_line()
    result = {"benchmark": "finetune", "base": BASE, "cpu": cpu, "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "training_rows": 2 * args.rows, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    base = rows[0]
    md = [f"# finetune ({BASE}, customer-support set)", "",
          f"{args.steps} steps x {args.batch_size} windows x {args.seq_len} tokens per run on {2 * args.rows} training rows "
          f"(responses and intent labels, loss on the answers only); held out: {args.heldout} responses (ROUGE-L F1, response "
          f"perplexity) and {args.heldout} intent labels (exact match). Peak memory: the process's maximum resident set. "
          f"CPU: {cpu}. Gradient checkpointing on for every run (`--grad-checkpoint`), so the memory compares like with like.", "",
          "| method | trainable | share | peak RSS MB | s | tokens/s | ROUGE-L | response ppl | intent acc |", "|---|---|---|---|---|---|---|---|---|",
          f"| base (no training) | - | - | - | - | - | {base['rouge_l']:.3f} | {base['response_ppl']:.2f} | {base['intent_acc']:.3f} |"]
    for r in rows[1:]:
        md.append(f"| {r['label']} | {r['trainable'] / 1e6:.2f}M | {r['trainable_share']:.2%} | {r['peak_rss_mb'] or 0:.0f} | {r['seconds']:.0f} | "
                  f"{r['tokens_per_s']:.0f} | {r['rouge_l']:.3f} | {r['response_ppl']:.2f} | {r['intent_acc']:.3f} |")
    by = {r["label"]: r for r in rows}
    if {"lora-r8", "full", "qlora-int8", "qlora-int4"} <= set(by):
        gain = lambda r: base["response_ppl"] - r["response_ppl"]  # noqa: E731
        md += ["", "## Targets", "",
               f"- LoRA r=8 reaches {gain(by['lora-r8']) / gain(by['full']):.0%} of full fine-tuning's response-perplexity gain "
               f"with {by['lora-r8']['trainable_share']:.2%} of the parameters trainable; peak memory {by['lora-r8']['peak_rss_mb'] or 0:.0f} MB vs "
               f"{by['full']['peak_rss_mb'] or 0:.0f} MB."
               + (f" LoRA r=16: {gain(by['lora-r16']) / gain(by['full']):.0%} with {by['lora-r16']['trainable_share']:.2%}." if "lora-r16" in by else ""),
               f"- QLoRA peak memory: int8 base {by['qlora-int8']['peak_rss_mb'] or 0:.0f} MB, int4 base {by['qlora-int4']['peak_rss_mb'] or 0:.0f} MB, "
               f"against LoRA's {by['lora-r8']['peak_rss_mb'] or 0:.0f} MB (QLoRA over children made by slmkit quantize, loaded without a float copy)."]
    md += ["", INTENT_NOTE]
    (RESULTS / "finetune.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
