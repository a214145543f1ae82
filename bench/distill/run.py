"""Distillation benchmark: the default model teaches its own structured children (about 74% and 52% of the parameters,
made by `slmkit prune --structured width`), on a mix of the project's data (TinyStories, the customer-support set,
WikiText-2 valid), against plain next-token training on the same tokens and steps.

For each student: WikiText-2 test perplexity, perplexity on a held-out slice of the training mix, ARC-Easy acc_norm,
bytes and decode tokens/s, after pruning alone, after distillation, and after plain training.

    .venv/bin/python bench/distill/run.py [--steps 120] [--seq-len 256] [--batch-size 4] [--synthetic 0] [--data ../shared/data]

The default budget (120 steps x 4 x 256 tokens = 123k tokens per run, four runs) takes about an hour on 2 cores here,
plus about 15 minutes the first time for the teacher's log-probabilities over the mix (cached for later runs).
Writes bench/results/distill.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, exists, RESULTS, ROOT, sh, SLMKIT  # noqa: E402

STUDENTS = [("width-100m", "100M"), ("width-70m", "70M")]


def make_mix(data: Path, out: Path, chars: int) -> tuple[Path, Path]:
    """A training mix (JSON lines of {text}) and a held-out slice of the same sources, about `chars` characters each
    source for training and a tenth of that held out."""
    rows, held = [], []
    stories = (data / "tinystories" / "tinystories_hf_validation_head.txt").read_text(encoding="utf-8").split("\n\n")
    support = list(csv.DictReader((data / "customer_support" / "bitext_customer_support_4514_responses.csv").open(encoding="utf-8")))
    wiki = (data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8").split("\n \n")
    sources = {"tinystories": [s for s in stories if s.strip()],
               "support": [f"Customer: {r['instruction']}\nAgent: {r['response']}" for r in support],
               "wikitext": [w for w in wiki if len(w.strip()) > 200]}
    for texts in sources.values():
        n, kept = 0, 0
        for i, t in enumerate(texts):
            if i % 10 == 9:
                held.append({"text": t})
                kept += 1
            else:
                rows.append({"text": t})
                n += len(t)
            if n > chars and kept >= 5:  # the budget's worth of training text, and at least five held-out documents
                break
    out.mkdir(parents=True, exist_ok=True)
    train, valid = out / "mix.jsonl", out / "heldout.txt"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid.write_text("\n\n".join(r["text"] for r in held))
    return train, valid


def measure(name: str, env: dict[str, str], out: Path, heldout: Path, data: Path, windows: int, arc: int) -> dict:
    res = {}
    ppl = ["--context-length", "512", "--stride", "256", "--limit", str(windows)]
    for tag, args in (("wiki", ["--ppl", str(data / "wikitext2" / "wiki.test.raw"), *ppl]), ("heldout", ["--ppl", str(heldout), *ppl]),
                      ("arc", ["--task", "arc_easy", "--limit", str(arc)]), ("speed", ["--speed"])):
        f = out / f"{name}-{tag}-{windows}-{arc}.json"
        if not f.is_file():  # a rerun reuses what an interrupted one measured
            sh(SLMKIT + ["eval", name, *args, "--out", str(f)], env)
        res[tag] = json.loads(f.read_text())["results"]
    card = json.loads(f.read_text())["model"]["card"]
    return {"model": name, "parameters": card["parameters"], "bytes": card["weights_bytes"].get("safetensors"),
            "wiki_ppl": res["wiki"]["perplexity"]["perplexity"], "heldout_ppl": res["heldout"]["perplexity"]["perplexity"],
            "arc_easy_acc_norm": res["arc"]["tasks"]["arc_easy"]["acc_norm"],
            "decode_tps": res["speed"]["speed"]["decode_tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per training run")
    ap.add_argument("--mix-steps", type=int, default=300, help="the training mix holds this many steps' worth of text "
                    "(kept apart from --steps, so runs of different lengths share one teacher cache)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--synthetic", type=int, default=0, help="teacher-written samples added to the mix")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--arc", type=int, default=150, help="ARC-Easy questions")
    ap.add_argument("--students", nargs="+", default=[s for s, _ in STUDENTS], choices=[s for s, _ in STUDENTS],
                    help="which pruned students to run (each costs two training runs)")
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    env = dict(os.environ, SLMKIT_HOME=args.home)
    out = Path(args.home) / "bench-distill"
    # enough text for the token budget (about 4 characters a token), spread over three sources
    chars = args.mix_steps * args.batch_size * (args.seq_len + 1) * 4 // 3
    train, heldout = make_mix(args.data, out, chars)
    sh(SLMKIT + ["models", "list"], env)
    rows = [{"label": "teacher", **measure(BASE, env, out, heldout, args.data, args.windows, args.arc)}]
    print(json.dumps(rows[-1]), flush=True)
    students = [(s, t) for s, t in STUDENTS if s in args.students]
    for suffix, target in students:
        pruned = f"{BASE}-{suffix}"
        if not exists(pruned, env):
            sh(SLMKIT + ["prune", BASE, "--structured", "width", "--target-params", target, "--calib",
                         str(args.data / "wikitext2" / "wiki.valid.tokens"), "--name", pruned, "--no-ppl"], env)
        rows.append({"label": f"{suffix}: pruned", **measure(pruned, env, out, heldout, args.data, args.windows, args.arc)})
        print(json.dumps(rows[-1]), flush=True)
        for kind, alpha in (("distilled", "0.5"), ("trained", "0")):
            name = f"{pruned}-{kind}-{args.steps}"
            if not exists(name, env):
                t = time.perf_counter()
                sh(SLMKIT + ["distill", "--teacher", BASE, "--student", pruned, "--data", str(train), "--alpha", alpha,
                             "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                             "--lr", str(args.lr), "--synthetic", str(args.synthetic if alpha != "0" else 0), "--name", name], env)
                took = time.perf_counter() - t
            else:  # made by an earlier run: its card kept the training time
                card = json.loads(subprocess.run(SLMKIT + ["models", "show", name, "--json"], env=env, capture_output=True,
                                                 text=True, check=True).stdout)
                took = card["settings"].get("seconds")
            rows.append({"label": f"{suffix}: {kind}", "seconds": took, **measure(name, env, out, heldout, args.data, args.windows, args.arc)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "distill", "teacher": BASE, "steps": args.steps, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "tokens_per_run": args.steps * args.batch_size * args.seq_len, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    t = rows[0]
    md = [f"# distill ({BASE} as teacher)", "",
          f"{args.steps} steps x {args.batch_size} windows x {args.seq_len} tokens per run (the same tokens for distillation, "
          "alpha 0.5 forward KL at tau 2 against the cached top-32, and for plain next-token training); data: TinyStories, "
          "the customer-support set and WikiText-2 valid; held-out: every tenth document of the same sources. Perplexity: "
          f"{args.windows} windows of 512 tokens; ARC-Easy acc_norm on {args.arc} questions.", "",
          "| model | params | MB | WikiText-2 ppl | held-out ppl | ARC-Easy acc_norm | decode tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['label']} | {r['parameters'] / 1e6:.1f}M | {(r['bytes'] or 0) / 1e6:.0f} | {r['wiki_ppl']:.2f} | "
                  f"{r['heldout_ppl']:.2f} | {r['arc_easy_acc_norm']:.3f} | {r['decode_tps']:.1f} |")
    md += ["", "## Targets", ""]
    for suffix, _ in students:
        by = {r["label"].split(": ")[1]: r for r in rows if r["label"].startswith(suffix)}
        gap = by["pruned"]["heldout_ppl"] - t["heldout_ppl"]
        rec = (by["pruned"]["heldout_ppl"] - by["distilled"]["heldout_ppl"]) / gap if gap > 0 else float("nan")
        md.append(f"- {suffix}: distillation recovers {rec:.0%} of the held-out perplexity gap pruning opened (target >= 50%); "
                  f"distilled {by['distilled']['heldout_ppl']:.2f} vs plain training {by['trained']['heldout_ppl']:.2f} "
                  f"({'beats' if by['distilled']['heldout_ppl'] < by['trained']['heldout_ppl'] else 'does NOT beat'} it); "
                  f"ARC-Easy {by['distilled']['arc_easy_acc_norm'] / t['arc_easy_acc_norm']:.0%} of the teacher's")
    md += ["", "Training wall time per run (seconds, from the cards): " + ", ".join(
        f"{r['label']} {r['seconds']:.0f}" for r in rows if r.get("seconds")) + ". The runs shared the 2 cores with other "
        "work, so these and the training tokens/s in the cards are slower than an idle machine's; decode tok/s were "
        "measured again on the idle machine."]
    (RESULTS / "distill.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
