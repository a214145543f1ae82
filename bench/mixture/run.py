"""Mixture-of-specialists benchmark (#33 item 2): three LoRA specialists of the default model, each fine-tuned on
one domain (TinyStories, customer-support answers, English novels), mixed by `slmkit mix` (Bayes weights from the
specialists' own likelihoods of the text, a fixed share back to the prior), against each specialist, a uniform
mixture (equal weights, never updated), one LoRA fine-tuned on all three domains together (the same steps in all),
and the base model. Perplexity on held-out text of each domain and on mixed-domain text (each window three pieces
from three domains).

    .venv/bin/python bench/mixture/run.py --data ../shared/data [--steps 80] [--windows 12] [--work /tmp/slmkit-mixture]

Writes bench/results/mixture.{json,md}.
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

WINDOW = 256  # tokens per evaluation window
HELD = 0.1  # the tail of each domain's text is held out
TRAIN_CHARS = 600_000  # of each domain's training text (about 150k tokens: more than the steps read; fine-tuning's
# validation split is 5% of what it is given, so more text only costs time)


def domains(data: Path) -> dict[str, str]:
    """Each domain's text (documents separated by blank lines)."""
    stories = (data / "tinystories" / "tinystories_hf_validation_head.txt").read_text(encoding="utf-8")
    with (data / "customer_support" / "bitext_customer_support_4514_responses.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(0).shuffle(rows)
    support = "\n\n".join(r["response"].strip() for r in rows)
    novels = "\n\n".join((data / "english_novels" / f).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
                         for f in ("Dickens_Oliver_1839.txt", "Conrad_Almayer_1895.txt"))
    return {"stories": stories, "support": support, "novels": novels}


def split(text: str) -> tuple[str, str]:
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD)))
    return text[:cut], text[cut:]


def windows(tokenize, held: dict[str, str], n: int) -> dict[str, list[list[int]]]:
    """n windows of WINDOW tokens per domain, and n mixed windows of three pieces from three domains in turn."""
    ids = {d: tokenize(t) for d, t in held.items()}
    out = {d: [x[i * WINDOW:(i + 1) * WINDOW] for i in range(n)] for d, x in ids.items()}
    third, names = WINDOW // 3, list(ids)
    mixed = []
    for i in range(n):
        order = names[i % 3:] + names[:i % 3]
        mixed.append([t for j, d in enumerate(order) for t in ids[d][(n + i) * WINDOW + j * third:(n + i) * WINDOW + (j + 1) * third]])
    out["mixed"] = mixed
    return out


def perplexity(backend, wins: list[list[int]]) -> float:
    lps = [token_logprobs(backend, w) for w in wins]
    return math.exp(-sum(float(x.sum()) for x in lps) / sum(len(x) for x in lps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-mixture"))
    ap.add_argument("--steps", type=int, default=80, help="LoRA steps per specialist (the all-data model gets three times as many)")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--share", type=float, default=0.02)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLMKIT_HOME": str(a.work / "home"), "PYTHONUNBUFFERED": "1"}
    os.environ["SLMKIT_HOME"] = env["SLMKIT_HOME"]
    texts = domains(a.data)
    train, held = {}, {}
    for d, t in texts.items():
        tr, he = split(t)
        train[d], held[d] = a.work / f"{d}.txt", he
        cut = tr.rfind("\n\n", 0, TRAIN_CHARS) if len(tr) > TRAIN_CHARS else len(tr)
        train[d].write_text(tr[:cut if cut > 0 else TRAIN_CHARS], encoding="utf-8")
    (a.work / "all.txt").write_text("\n\n".join(p.read_text(encoding="utf-8") for p in train.values()), encoding="utf-8")
    res: dict = {"cpu": cpu_line(), "settings": {"steps": a.steps, "windows": a.windows, "window": WINDOW, "share": a.share, "lora_r": 16},
                 "train_s": {}}
    lora = ["--method", "lora", "--r", "16", "--seq-len", str(WINDOW), "--batch-size", "4", "--lr", "0.001"]
    made = {}
    for d, path in [*train.items(), ("all", a.work / "all.txt")]:
        name = made[d] = f"spec-{d}"
        steps = a.steps * (3 if d == "all" else 1)
        if exists(name, env):
            continue
        t0 = time.perf_counter()
        slmkit(["finetune", BASE, "--data", str(path), "--steps", str(steps), "--name", name, *lora], env)
        res["train_s"][d] = round(time.perf_counter() - t0, 1)
        print(f"trained {name} in {res['train_s'][d]} s", flush=True)
    specs = [made[d] for d in train]
    for mix, share in (("mix-bayes", a.share), ("mix-bayes-exact", 0.0)):
        if not exists(mix, env):
            slmkit(["mix", *specs, "--name", mix, "--share", str(share)], env)

    from slmkit.engine.mixture import MixtureBackend
    from slmkit.loading import load

    base = load(BASE, backend="torch").backend
    wins = windows(lambda t: base.encode(t, add_special_tokens=False), held, a.windows)
    backends = {"base": base, **{f"specialist {d}": load(made[d], backend="torch").backend for d in train},
                "one LoRA on all domains": load(made["all"], backend="torch").backend}
    parts = [backends[f"specialist {d}"] for d in train]
    backends["uniform mixture"] = MixtureBackend(parts, None, 1.0, names=specs)  # share 1: the prior at every token
    backends[f"Bayes mixture (share {a.share})"] = load("mix-bayes", backend="torch").backend
    backends["Bayes mixture (exact, share 0)"] = load("mix-bayes-exact", backend="torch").backend
    table = {}
    for label, b in backends.items():
        t0 = time.perf_counter()
        table[label] = {k: perplexity(b, w) for k, w in wins.items()}
        table[label]["seconds"] = round(time.perf_counter() - t0, 1)
        print(label, {k: round(v, 2) for k, v in table[label].items()}, flush=True)
    res["perplexity"] = table
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mixture.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "mixture.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    t = res["perplexity"]
    cols = [k for k in next(iter(t.values())) if k != "seconds"]
    s = res["settings"]
    lines = ["# mixture of specialists by total probability", "",
             f"CPU: {res['cpu']}. Specialists: LoRA r {s['lora_r']} of {BASE}, {s['steps']} steps x 4 x {s['window']} tokens on one "
             f"domain each (the all-domains LoRA: {3 * s['steps']} steps on all three). Held out: the last 10% of each domain's text; "
             f"{s['windows']} windows of {s['window']} tokens per domain, and {s['windows']} mixed windows (a third from each domain, "
             "in turn). Perplexity; lower is better.", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, row in t.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    specialists = [k for k in t if k.startswith("specialist ")]
    bayes = next(k for k in t if k.startswith("Bayes mixture (share"))
    best_single = min(t[k]["mixed"] for k in specialists)
    lines += ["", "## Targets", "",
              f"- mixed-domain text: the mixture {t[bayes]['mixed']:.2f} vs the best single specialist {best_single:.2f} and the uniform "
              f"mixture {t['uniform mixture']['mixed']:.2f} (target: lower than both: "
              f"{'met' if t[bayes]['mixed'] < min(best_single, t['uniform mixture']['mixed']) else 'not met'})"]
    for c in cols:
        if c == "mixed":
            continue
        own = t[f"specialist {c}"][c]
        lines.append(f"- {c}: the mixture {t[bayes][c]:.2f} vs its specialist {own:.2f} ({t[bayes][c] / own - 1:+.1%}; target within +3%: "
                     f"{'met' if t[bayes][c] <= own * 1.03 else 'not met'})")
    if res["train_s"]:
        lines += ["", "Training wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["train_s"].items())
                  + ". Evaluation seconds per model are in the JSON."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
