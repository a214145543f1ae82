"""The lean forward's KV cache in bfloat16 (integer models, engine/lean_forward.KV_BF16) against float32: what it costs
in quality and what it saves in time, on the default model's w8a8 and w4a8 children, one machine, one run.

- quality: WikiText-2 test perplexity through the lean forward itself (windows of 512 tokens, each prefilled into the
  slot cache with the logits after every position: every piece's attention reads the keys and values back from the
  cache, rounded as decode steps read them; slmkit eval scores with transformers' forward, which has no cache);
- time: a decode step of 1 and 16 rows over 150 and 500 cached tokens per row (the one-call step where it runs).

    .venv/bin/python bench/kv_cache/run.py [--home /tmp/slmkit-bench-home] [--data ../shared/data] [--windows 20]

Writes bench/results/kv_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, ROOT, cpu_line, write_results  # noqa: E402

MODELS = (f"{BASE}-w8a8", f"{BASE}-w4a8")
WINDOW = 512


def load(name: str, bf16: bool):  # noqa: ANN201
    import slmkit
    from slmkit.engine import lean_forward

    lean_forward.KV_BF16 = bf16
    try:
        return slmkit.load(name, backend="torch").backend
    finally:
        lean_forward.KV_BF16 = True


def perplexity(backend, text: str, windows: int) -> float:  # noqa: ANN001
    import torch

    ids = backend.encode(text)
    fast, nll, count = backend.fast, 0.0, 0
    for w in range(windows):
        chunk = torch.tensor([ids[w * WINDOW: (w + 1) * WINDOW]])
        cache = fast.new_cache(1, capacity=WINDOW)
        logits = fast.forward(cache, chunk, every=True)[0].float()  # (T, V)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def step_ms(backend, rows: int, cached: int) -> float:  # noqa: ANN001
    import torch

    fast = backend.fast
    cache = fast.new_cache(rows, capacity=cached + 8)
    for s in range(rows):
        fast.forward(cache, torch.randint(0, 40000, (1, cached)), first=s)
    x = torch.randint(0, 40000, (rows, 1))

    def step() -> None:
        fast.forward(cache, x)
        for s in range(rows):
            cache.drop(s, 1)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    return (time.perf_counter() - t0) / 20 * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--windows", type=int, default=20)
    args = ap.parse_args()
    os.environ["SLMKIT_HOME"] = args.home
    import torch

    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.sources.importer import ensure_default
    from slmkit.store import Store

    ensure_default()
    for name in MODELS:
        if not Store().exists(name):
            scheme = name.rsplit("-", 1)[1]
            quantize_stage(BASE, scheme, name=name, group_size=32 if scheme == "w4a8" else None)
    text = (args.data / "wikitext2" / "wiki.test.raw").read_text()
    result: dict = {"benchmark": "kv_cache", "cpu": cpu_line(), "threads": torch.get_num_threads(), "windows": args.windows,
                    "models": {}}
    for name in MODELS:
        row: dict = {}
        for bf16 in (False, True):
            backend = load(name, bf16)
            kind = "bf16" if bf16 else "f32"
            with torch.inference_mode():
                row[kind] = {"kv_dtype": str(backend.fast.kv_dtype), "perplexity": perplexity(backend, text, args.windows),
                             **{f"step_{r}x{c}_ms": step_ms(backend, r, c) for r in (1, 16) for c in (150, 500)}}
            print(name, kind, json.dumps(row[kind]), flush=True)
        result["models"][name] = row
    write_results("kv_cache", result, report(result))


def report(r: dict) -> str:
    md = ["# The KV cache in bfloat16 vs float32 (integer children of the default model)", "",
          f"CPU: {r['cpu']}; {r['threads']} threads; one run. Perplexity: WikiText-2 test, {r['windows']} windows of "
          f"{WINDOW} tokens through the lean forward (every position's attention reads the cache back). Step: one decode "
          "step of R rows over C cached tokens each (ms; the one-call step where it runs).", "",
          "| model | KV | perplexity | vs float32 KV | step 1x150 | 1x500 | 16x150 | 16x500 |", "|---|---|---|---|---|---|---|---|"]
    for name, row in r["models"].items():
        base = row["f32"]["perplexity"]
        for kind in ("f32", "bf16"):
            x = row[kind]
            md.append(f"| {name} | {kind} | {x['perplexity']:.3f} | {100 * (x['perplexity'] / base - 1):+.2f}% | "
                      f"{x['step_1x150_ms']:.1f} | {x['step_1x500_ms']:.1f} | {x['step_16x150_ms']:.1f} | {x['step_16x500_ms']:.1f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
