"""How llama.cpp's decode step grows with the number of sequences, per GGUF type: the ceiling of any batching
server built on it, with no HTTP or sampling in the way.

For each GGUF (the default model's packaged Q4_1 plus exports of the same weights) and each batch size, fill
that many slots of slmkit's llama.cpp batch store (`LlamaCppSlots`) with a ~128-token prompt, then time decode
steps of one token per sequence. Types alternate within each round, so they are compared minutes apart.

    .venv/bin/python bench/llamacpp_batch.py [--batches 1 4 8 16 32] [--steps 24] [--rounds 3]

Exports are made once into $SLMKIT_HOME/exports/. Writes bench/results/llamacpp_batch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT  # noqa: E402

TYPES = ["Q4_1", "Q4_0", "Q8_0", "F16", "F32"]


def gguf_files(name: str) -> dict[str, Path]:
    """The packaged Q4_1 and exports of the same float weights, made once."""
    from slmkit.config import settings
    from slmkit.export.store_export import export_model
    from slmkit.store import Store

    files = {"Q4_1": Store().path(name) / "model.gguf"}
    for t in TYPES[1:]:
        out = settings().home / "exports" / f"{name}-{t.lower()}"
        found = sorted(out.glob("*.gguf")) if out.is_dir() else []
        if not found:
            export_model(name, t, out_dir=out)
            found = sorted(out.glob("*.gguf"))
        files[t] = found[0]
    return files


def step_ms(gguf: Path, batch: int, steps: int, prompt: list[int]) -> float:
    """Median ms of a decode step with `batch` sequences in flight."""
    from slmkit.config import settings
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.llamacpp_batch import LlamaCppSlots

    backend = LlamaCppBackend(gguf, threads=settings().threads, n_ctx=64)
    store = LlamaCppSlots(backend, batch, len(prompt) + steps + 8)
    try:
        state = None
        for _ in range(batch):  # the first prompt computed, the others restored from its state (as the prefix cache does)
            _, state = store.prefill(prompt, len(prompt) - 1 if state else 0, state, export=True)
            store.join()
        last = [int(prompt[-1])] * batch
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            store.step(last)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[2:])
    finally:
        store.close()
        backend.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from rich.console import Console

    from slmkit import progress
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.sources.importer import ensure_default

    progress.enable(Console(stderr=True))

    name = ensure_default()
    files = gguf_files(name)
    tok = LlamaCppBackend(files["Q4_1"], n_ctx=64)
    prompt = tok.encode("The lighthouse stood at the edge of the northern cliffs, where the sea met the land. " * 7)[:128]
    tok.close()
    runs: dict[str, dict[int, list[float]]] = {t: {b: [] for b in args.batches} for t in TYPES}
    with progress.bar("llama.cpp steps", total=args.rounds * len(TYPES) * len(args.batches)) as advance:
        for _ in range(args.rounds):
            for b in args.batches:
                for t in TYPES:  # types side by side within a round
                    runs[t][b].append(step_ms(files[t], b, args.steps, prompt))
                    advance()
    table = {t: {b: statistics.median(v) for b, v in by_b.items()} for t, by_b in runs.items()}
    result = {"benchmark": "llamacpp_batch", "model": name, "prompt_tokens": len(prompt), "steps": args.steps,
              "rounds": args.rounds, "sizes_mb": {t: round(files[t].stat().st_size / 1e6, 1) for t in TYPES},
              "step_ms": {t: {str(b): round(ms, 2) for b, ms in v.items()} for t, v in table.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamacpp_batch.json").write_text(json.dumps(result, indent=2) + "\n")
    first = args.batches[0]
    md = [f"# llama.cpp decode step by batch size ({name})", "",
          f"slmkit's llama.cpp batch store (one multi-sequence context, flash attention, f16 KV), {len(prompt)}-token "
          f"prompt per sequence, median of {args.steps} steps, median of {args.rounds} rounds (types alternating). "
          "tok/s = batch / step time: the most any server on these kernels can reach, before HTTP and sampling.", "",
          "| type | MB | " + " | ".join(f"{b} seq: ms (tok/s)" for b in args.batches) + f" | {args.batches[-1]} vs {first} tok/s |",
          "|---|---|" + "---|" * (len(args.batches) + 1)]
    for t in TYPES:
        cells = [f"{table[t][b]:.1f} ({1000 * b / table[t][b]:.0f})" for b in args.batches]
        gain = (args.batches[-1] / table[t][args.batches[-1]]) / (first / table[t][first])
        md.append(f"| {t} | {result['sizes_mb'][t]} | " + " | ".join(cells) + f" | {gain:.1f}x |")
    (RESULTS / "llamacpp_batch.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
