"""Speculative decoding by prompt lookup (`--speculative N`, engine/speculative.py) against plain greedy decoding, batch
1, on input-grounded prompts (edit or repeat a given passage; 256-token answers) and on an open-ended one, through the
PyTorch engine's lean forward; the same greedy text is required.

    .venv/bin/python bench/speculative/run.py [--models smollm2-135m-instruct smollm2-135m-instruct-w8a8] [--drafts 4 8]

Writes bench/results/speculative.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, RESULTS, cpu_line  # noqa: E402

PASSAGE = ("The lighthouse stood at the edge of the northern cliffs, where the sea met the land in a long line of white "
           "foam. Every evening the keeper climbed the spiral stairs, trimmed the wick, and watched the beam sweep across "
           "the water. Ships passing in the night counted the flashes to learn where they were, and the keeper counted "
           "the ships. One winter a storm came that lasted nine days, and on the third night a small boat appeared below "
           "the rocks.")
CODE = ("def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n        subtotal += item.price * "
        "item.quantity\n    tax = subtotal * tax_rate\n    return subtotal + tax\n")
PROMPTS = {
    "repeat a passage": f"Repeat this text exactly, word for word:\n\n{PASSAGE}",
    "edit a passage": f"Rewrite this text in the past perfect tense, changing nothing else:\n\n{PASSAGE}",
    "edit code": f"Rename the variable subtotal to net in this function and return the whole function:\n\n{CODE}",
    "open-ended": "Write a short story about a robot who learns to paint.",
}


def run(name: str, drafts: list[int], tokens: int) -> dict:
    import slmkit
    from slmkit.engine.sampling import SamplingParams

    model = slmkit.load(name, backend="torch")
    backend = model.backend
    out: dict = {}
    for label, prompt in PROMPTS.items():
        ids = backend.encode(backend.render_chat([{"role": "user", "content": prompt}]), parse_special=True)
        row: dict = {}
        texts = {}
        for n in [0, *drafts]:
            params = SamplingParams(temperature=0, repetition_penalty=1.0, speculative=n)
            list(backend.stream_tokens(ids, params, 8))  # warm up
            t0 = time.perf_counter()
            got = list(backend.stream_tokens(ids, params, tokens))
            row[n] = len(got) / (time.perf_counter() - t0)
            texts[n] = got
        row = {"plain_tok_s": row[0], **{f"draft_{n}_tok_s": row[n] for n in drafts}, "tokens": len(texts[0]),
               "same_text": all(texts[n] == texts[0] for n in drafts)}
        out[label] = row
        print(name, label, json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--models", nargs="+", default=[BASE, f"{BASE}-w8a8"])
    ap.add_argument("--drafts", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    os.environ["SLMKIT_HOME"] = args.home
    result = {"benchmark": "speculative", "cpu": cpu_line(), "tokens": args.tokens, "drafts": args.drafts,
              "models": {name: run(name, args.drafts, args.tokens) for name in args.models}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "speculative.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    md = ["# Speculative decoding by prompt lookup (batch 1, greedy)", "",
          f"CPU: {r['cpu']}. Up to {r['tokens']} tokens per answer (fewer where the model stopped), chat template, "
          "temperature 0, no repetition penalty; tokens/s over the whole answer, prefill excluded; one run.", "",
          "| model | prompt | tokens | plain tok/s | " + " | ".join(f"draft {n} tok/s (x)" for n in r["drafts"]) + " | same text |",
          "|---|---|---|---|" + "---|" * len(r["drafts"]) + "---|"]
    for name, rows in r["models"].items():
        for label, x in rows.items():
            cells = " | ".join(f"{x[f'draft_{n}_tok_s']:.1f} ({x[f'draft_{n}_tok_s'] / x['plain_tok_s']:.2f}x)" for n in r["drafts"])
            md.append(f"| {name} | {label} | {x['tokens']} | {x['plain_tok_s']:.1f} | {cells} | {'yes' if x['same_text'] else 'NO'} |")
    md += ["", "Same text: the check pass runs several tokens through the multi-row path (torch's attention and norms), the "
           "plain step through slmkit's one-call decode kernel. In float32 the two agree to ~1e-5 and the greedy text is "
           "identical. The int8 weight-only child computes in bfloat16, where the two paths round differently; in W8A8 the "
           "activations are rounded to int8 per token, a discontinuous function: differences of 1e-6 between the two paths "
           "flip roundings and grow through the blocks (logits differ by up to ~3 between slmkit's kernels and torch's ops "
           "on the default model's w8a8 child, prefill or decode alike). There the greedy text can part where two tokens "
           "are within that margin. Speculative decoding is exact on float32 models and near-exact on the integer ones; it "
           "stays off unless asked for (`--speculative N`)."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
