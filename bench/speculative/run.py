"""Speculative decoding by prompt lookup (`--speculative N`, engine/speculative.py) against plain greedy decoding, batch
1, on input-grounded prompts (edit or repeat a given passage; 256-token answers) and on an open-ended one, through the
PyTorch engine's lean forward; the same greedy text is required.

    .venv/bin/python bench/speculative/run.py [--models smollm2-135m-instruct smollm2-135m-instruct-w8a8] [--drafts 4 8]

A model named BASE-w8a8 or BASE-w4a8 that the bench home lacks is made first (round to nearest; w4a8: groups of 32,
its default 8-bit head with the embedding read from it). Writes bench/results/speculative.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, cpu_line, write_results  # noqa: E402

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


def ensure(name: str) -> None:
    """Make BASE-w8a8 / BASE-w4a8 in the bench home where missing."""
    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.store import Store

    if Store().exists(name) or name not in (f"{BASE}-w8a8", f"{BASE}-w4a8"):
        return
    scheme = name.rsplit("-", 1)[1]
    quantize_stage(BASE, scheme, name=name, group_size=32 if scheme == "w4a8" else None)


def run(name: str, drafts: list[int], tokens: int) -> dict:
    import slmkit
    from slmkit.engine.sampling import SamplingParams

    ensure(name)
    model = slmkit.load(name, backend="torch")
    backend = model.backend
    out: dict = {}
    for label, prompt in PROMPTS.items():
        ids = backend.encode(backend.render_chat([{"role": "user", "content": prompt}]), parse_special=True)
        row: dict = {}
        texts, kept = {}, {}
        for n in [0, *drafts]:
            params = SamplingParams(temperature=0, repetition_penalty=1.0, speculative=n)
            list(backend.stream_tokens(ids, params, 8))  # warm up
            t0 = time.perf_counter()
            steps = list(backend.stream_steps(ids, params, tokens))
            row[n] = len(steps) / (time.perf_counter() - t0)
            texts[n] = [s.token for s in steps]
            drafted = sum(s.checked for s in steps)
            kept[n] = (sum(s.drafted for s in steps) / drafted if drafted else None, sum(s.checked > 0 for s in steps))
        row = {"plain_tok_s": row[0], **{f"draft_{n}_tok_s": row[n] for n in drafts},
               **{f"draft_{n}_acceptance": kept[n][0] for n in drafts}, **{f"draft_{n}_checks": kept[n][1] for n in drafts},
               "tokens": len(texts[0]), "same_text": all(texts[n] == texts[0] for n in drafts)}
        out[label] = row
        print(name, label, json.dumps(row), flush=True)
    return out


def batched(name: str, streams: int, drafts: list[int], tokens: int) -> dict:
    """`streams` requests at once through the continuous batch (the server's scheduler, without HTTP), the four
    prompts in turn, each mode in its own scheduler; aggregate tokens/s, acceptance, and the answers that equal the
    plain batch's."""
    import threading

    import slmkit
    from slmkit.engine.sampling import SamplingParams
    from slmkit.engine.scheduler import BatchedBackend

    out: dict = {"streams": streams}
    answers = {}
    for n in [0, *drafts]:
        batch = BatchedBackend(lambda: slmkit.load(name, backend="torch").backend, max_batch=streams)  # loaded on its thread
        prompts = [batch.encode(batch.render_chat([{"role": "user", "content": p}]), parse_special=True) for p in PROMPTS.values()]
        params = SamplingParams(temperature=0, repetition_penalty=1.0, speculative=n)
        list(batch.stream_tokens(prompts[0], params, 8))  # warm up
        got: dict[int, list] = {}

        def one(i: int) -> None:
            got[i] = list(batch.stream_steps(prompts[i % len(prompts)], params, tokens))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        batch.scheduler.stop()
        steps = [s for i in range(streams) for s in got[i]]
        drafted = sum(s.checked for s in steps)
        answers[n] = [[s.token for s in got[i]] for i in range(streams)]
        out[str(n)] = {"tok_s": len(steps) / seconds, "tokens": len(steps), "seconds": seconds,
                  "acceptance": sum(s.drafted for s in steps) / drafted if drafted else None,
                  "same_answers": sum(a == b for a, b in zip(answers[n], answers[0]))}
        print(name, "batched", n, json.dumps(out[str(n)]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--models", nargs="+", default=[BASE, f"{BASE}-w8a8", f"{BASE}-w4a8"])
    ap.add_argument("--drafts", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--streams", type=int, default=16, help="concurrent requests through the continuous batch (0: skip)")
    ap.add_argument("--batched-model", default=f"{BASE}-w8a8")
    args = ap.parse_args()
    os.environ["SLMKIT_HOME"] = args.home
    result = {"benchmark": "speculative", "cpu": cpu_line(), "tokens": args.tokens, "drafts": args.drafts,
              "models": {name: run(name, args.drafts, args.tokens) for name in args.models}}
    if args.streams:
        ensure(args.batched_model)
        result["batched"] = {args.batched_model: batched(args.batched_model, args.streams, args.drafts, args.tokens)}
    write_results("speculative", result, report(result))


def report(r: dict) -> str:
    md = ["# Speculative decoding by prompt lookup (batch 1, greedy)", "",
          f"CPU: {r['cpu']}. Up to {r['tokens']} tokens per answer (fewer where the model stopped), chat template, "
          "temperature 0, no repetition penalty; tokens/s over the whole answer, prefill excluded; one run. Each draft "
          "column: tokens/s (ratio to plain), the share of drafted tokens kept, and the checks run.", "",
          "| model | prompt | tokens | plain tok/s | " + " | ".join(f"draft {n}: tok/s (x), kept, checks" for n in r["drafts"]) + " | same text |",
          "|---|---|---|---|" + "---|" * len(r["drafts"]) + "---|"]

    def cell(x: dict, n: int) -> str:
        acc = x.get(f"draft_{n}_acceptance")
        return (f"{x[f'draft_{n}_tok_s']:.1f} ({x[f'draft_{n}_tok_s'] / x['plain_tok_s']:.2f}x), "
                f"{'-' if acc is None else f'{acc:.0%}'}, {x.get(f'draft_{n}_checks', '-')}")

    for name, rows in r["models"].items():
        for label, x in rows.items():
            cells = " | ".join(cell(x, n) for n in r["drafts"])
            md.append(f"| {name} | {label} | {x['tokens']} | {x['plain_tok_s']:.1f} | {cells} | {'yes' if x['same_text'] else 'NO'} |")
    for name, b in r.get("batched", {}).items():
        md += ["", f"## {b['streams']} streams through the continuous batch ({name})", "",
               f"{b['streams']} requests at once through the server's scheduler (no HTTP), the four prompts above in turn, "
               f"up to {r['tokens']} tokens each, greedy; aggregate tokens/s over the whole run (prefills included).", "",
               "| drafts | tok/s (x plain) | kept | answers equal to the plain batch's |", "|---|---|---|---|"]
        for n in ["0", *map(str, r["drafts"])]:
            x, acc = b[n], b[n]["acceptance"]
            md.append(f"| {n} | {x['tok_s']:.1f} ({x['tok_s'] / b['0']['tok_s']:.2f}x) | "
                      f"{'-' if acc is None else f'{acc:.0%}'} | {x['same_answers']} of {b['streams']} |")
    md += ["", "Same text: a check runs the drafted tokens as one-token rows of the sequence's slot, on the kernels a "
           "one-token step uses (slmkit's attention writes every row's key and value before any row attends; every "
           "integer layer takes its one-row kernel): on the w8a8 and w4a8 children each row's logits are bit-identical "
           "to plain decoding's (tests/test_speculative.py), in float32 within float rounding. Models without slmkit's "
           "decode kernels (bfloat16 ones such as the int8 weight-only child) check as one row of several positions "
           "through torch's attention, where the greedy text can part. Where checks cost more per token than plain "
           "steps (little of the answer repeats the prompt), drafting pauses for 16 plain tokens, doubling while it "
           "keeps losing (engine/speculative.Throttle); it stays off unless asked for (`--speculative N`)."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
