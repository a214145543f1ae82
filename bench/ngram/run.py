"""Whitebox n-gram student benchmark (#33 item 1): on the customer-support answers, a 3-gram model read off the
default model (`slmkit ngram`: the teacher's likeliest branches from every position of the text, its next-token
distributions as fractional counts) against the classic 3-gram model counted from the same text
(`slmkit ngram --from-text`), the whitebox pruned to the classic model's size, the teacher, and a neural student.
Held-out perplexity, size on disk, tokens/s (decoding through slmkit's loop, and scoring), and each n-gram
interpolated with a neural model (does the whitebox add something a neural model lacks?).

    .venv/bin/python bench/ngram/run.py --data ../shared/data [--budget 150000] [--windows 24]
        [--student NAME --student-home DIR] [--work /tmp/slmkit-ngram]

Writes bench/results/ngram.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, cpu_line, exists, RESULTS, slmkit, token_logprobs  # noqa: E402

CSV = "customer_support/bitext_customer_support_4514_responses.csv"
WINDOW = 256
HELD = 0.1
PROMPT = "Thank you for reaching out. To cancel your order, "
DECODE = 128  # tokens decoded greedily for the speed measure


def texts(data: Path) -> tuple[str, str]:
    """The support answers (shuffled, seed 0), blank-line separated: training text and the held-out tail."""
    with (data / CSV).open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(0).shuffle(rows)  # as bench/mixture does: its support specialist never saw this held-out text
    text = "\n\n".join(r["response"].strip() for r in rows)
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD)))
    return text[:cut], text[cut:]


def decode_speed(backend) -> float:
    from slmkit.engine.sampling import SamplingParams

    prompt = backend.encode(PROMPT)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    list(backend.stream_steps(prompt, greedy, 8))  # warm
    t0 = time.perf_counter()
    n = sum(1 for _ in backend.stream_steps(prompt, greedy, DECODE))
    return n / (time.perf_counter() - t0)


def mix_loss(a, b, lam: float) -> float:
    import numpy as np

    return -float(np.logaddexp(a + math.log(lam), b + math.log(1 - lam)).mean())


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-ngram"))
    ap.add_argument("--budget", type=int, default=150_000, help="tokens the teacher reads (text and branches)")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--windows", type=int, default=24, help=f"held-out windows of {WINDOW} tokens")
    ap.add_argument("--student", help="a neural student to compare and interpolate with (a store model)")
    ap.add_argument("--student-home", type=Path, help="the SLMKIT_HOME holding --student (default: the work store)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLMKIT_HOME": str(a.work / "home"), "PYTHONUNBUFFERED": "1"}
    os.environ["SLMKIT_HOME"] = env["SLMKIT_HOME"]
    train, held = texts(a.data)
    (a.work / "train.txt").write_text(train, encoding="utf-8")
    res: dict = {"cpu": cpu_line(), "settings": {"budget": a.budget, "order": a.order, "windows": a.windows, "window": WINDOW},
                 "make_s": {}}
    common = ["--data", str(a.work / "train.txt"), "--order", str(a.order)]
    if not exists("ngram-text", env):
        t0 = time.perf_counter()
        slmkit(["ngram", "--from-text", "--name", "ngram-text", *common], env)
        res["make_s"]["ngram-text"] = round(time.perf_counter() - t0, 1)
    from slmkit.store import Store

    store = Store()
    text_entries = sum(store.card("ngram-text").settings["entries"])
    for name, extra in (("whitebox", []), ("whitebox-small", ["--max-entries", str(text_entries)])):
        if not exists(name, env):
            t0 = time.perf_counter()
            slmkit(["ngram", "--name", name, "--budget", str(a.budget), *common, *extra], env)
            res["make_s"][name] = round(time.perf_counter() - t0, 1)
            print(f"made {name} in {res['make_s'][name]} s", flush=True)

    from slmkit.loading import load

    teacher = load(BASE, backend="torch").backend
    eos = sorted(teacher.eos_token_ids)[:1]  # documents as training packs them: each one's tokens, then EOS
    ids = [t for doc in held.split("\n\n") if doc.strip() for t in teacher.encode(doc.strip(), add_special_tokens=False) + eos]
    wins = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(a.windows)]
    models = {"teacher (default model, PyTorch)": teacher}
    if a.student:
        models[f"neural student {a.student}"] = load(a.student, backend="torch",
                                                     store=Store(a.student_home / "models") if a.student_home else None).backend
    for name in ("ngram-text", "whitebox", "whitebox-small"):
        models[name] = load(name).backend
    rows, lps = {}, {}
    for label, b in models.items():
        t0 = time.perf_counter()
        lps[label] = np.concatenate([token_logprobs(b, w) for w in wins])
        seconds = time.perf_counter() - t0
        card = store.card(label) if label in ("ngram-text", "whitebox", "whitebox-small") else None
        rows[label] = {"perplexity": math.exp(-float(lps[label].mean())), "score_tok_s": len(lps[label]) / seconds,
                       "decode_tok_s": decode_speed(b),
                       "size_mb": round((store.path(label) / "model.arpa").stat().st_size / 1e6, 2) if card else None,
                       "entries": sum(card.settings["entries"]) if card else None,
                       "make_s": card.settings["seconds"] if card else None}
        print(label, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[label].items()}, flush=True)
    res["models"] = rows
    # the teacher's fastest engine for decoding: llama.cpp on its GGUF (the default model ships one)
    res["teacher_llamacpp_decode_tok_s"] = decode_speed(load(BASE, backend="llamacpp").backend)
    # the n-gram pure scoring rate (vectorized lookups, no dense rows): what a per-token score costs
    from slmkit.engine import ngram_ops as ng

    wb = models["whitebox"].model
    flat = np.array([t for w in wins for t in w])
    hist = np.stack([flat[i:len(flat) - a.order + 1 + i] for i in range(a.order - 1)], 1)
    t0 = time.perf_counter()
    ng.logprob(wb, hist, flat[a.order - 1:])
    res["ngram_lookup_tok_s"] = (len(flat) - a.order + 1) / (time.perf_counter() - t0)
    # interpolations: lambda fitted on the first half of the windows, reported on the second
    half = (a.windows // 2) * (WINDOW - 1)
    neural = [k for k in rows if not k.startswith(("ngram", "whitebox"))]
    res["interpolations"] = {}
    for nn_label in neural:
        for ng_label in ("ngram-text", "whitebox"):
            x, y = lps[ng_label], lps[nn_label]
            lam = min((l / 100 for l in range(1, 60)), key=lambda v: mix_loss(x[:half], y[:half], v))
            res["interpolations"][f"{nn_label} + {ng_label}"] = {
                "lambda": lam, "perplexity": math.exp(mix_loss(x[half:], y[half:], lam)),
                "neural_alone": math.exp(-float(y[half:].mean()))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ngram.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "ngram.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    s, m = res["settings"], res["models"]
    lines = ["# whitebox n-gram student (`slmkit ngram`)", "",
             f"CPU: {res['cpu']}. Domain: customer-support answers (shuffled, seed 0), the last 10% held out; "
             f"{s['windows']} held-out windows of {s['window']} tokens (documents joined by EOS, as training packs them). {s['order']}-gram models over the default model's tokenizer; "
             f"the whitebox read {s['budget']:,} teacher tokens (text and branches). Decode: {DECODE} greedy tokens through "
             "slmkit's decode loop (batch 1); score: every position of the held-out windows.", "",
             "| model | held-out perplexity | n-grams | ARPA MB | made in s | decode tok/s | score tok/s |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for label, r in m.items():
        lines.append(f"| {label} | {r['perplexity']:.2f} | {fmt(r['entries'], ',')} | {fmt(r['size_mb'], '.1f')} | {fmt(r['make_s'], '.0f')} | "
                     f"{r['decode_tok_s']:.0f} | {r['score_tok_s']:,.0f} |")
    lines += ["", f"Scoring by table lookups alone (no full rows): {res['ngram_lookup_tok_s']:,.0f} tokens/s.", "",
              "| interpolation (lambda on the n-gram, fitted on half the windows) | lambda | perplexity (other half) | neural alone |",
              "|---|---|---|---|"]
    for label, r in res["interpolations"].items():
        lines.append(f"| {label} | {r['lambda']:.2f} | {r['perplexity']:.2f} | {r['neural_alone']:.2f} |")
    teacher = next(v for k, v in m.items() if k.startswith("teacher"))
    small, text = m["whitebox-small"], m["ngram-text"]
    lines += ["", "## Targets", "",
              f"- the whitebox beats the n-gram counted from the text at the same size: {small['perplexity']:.2f} ({small['entries']:,} n-grams) "
              f"vs {text['perplexity']:.2f} ({text['entries']:,}): {'met' if small['perplexity'] < text['perplexity'] else 'not met'}",
              f"- at least 100x faster per token than the teacher: decoding {m['whitebox']['decode_tok_s'] / teacher['decode_tok_s']:.0f}x "
              f"the teacher on PyTorch float32 and {m['whitebox']['decode_tok_s'] / res['teacher_llamacpp_decode_tok_s']:.0f}x the "
              f"teacher on llama.cpp ({res['teacher_llamacpp_decode_tok_s']:.0f} tokens/s, its GGUF), scoring "
              f"{m['whitebox']['score_tok_s'] / teacher['score_tok_s']:.0f}x through full rows and "
              f"{res['ngram_lookup_tok_s'] / teacher['score_tok_s']:.0f}x by lookups alone: "
              f"{'met' if m['whitebox']['decode_tok_s'] >= 100 * res['teacher_llamacpp_decode_tok_s'] else 'met against PyTorch, not against llama.cpp for decoding'}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
