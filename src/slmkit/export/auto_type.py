"""`export --type auto`: try each quantized GGUF type on the model, measure its size and its perplexity in llama.cpp
against the F32 file's on the same WikiText-2 sample, and pick the smallest within the budget.

Measured, not guessed: which type is smallest depends on the model's row widths (K-quants fall back to larger
types where rows do not fit 256-wide blocks: the default model's 576-wide rows make Q4_K_M larger than Q4_1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.errors import SlmkitError
from slmkit.export.gguf import quantize_gguf, write_gguf_f32
from slmkit.gguf_tables import AUTO_CANDIDATES


def gguf_perplexity(path: Path, threads: int | None) -> float:
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.evaluate.quick import quick_perplexity
    from slmkit.model import Model

    return quick_perplexity(Model(path.stem, LlamaCppBackend(path, threads=threads)))


def check_budget(budget: float) -> None:
    if not 0 < budget < 10:
        raise SlmkitError(f"--ppl-budget {budget} is outside (0, 10)", "Give the allowed perplexity increase as a share, e.g. 0.05 for 5%.")


def choose_type(source: Path, budget: float, workdir: Path, *, threads: int | None = None,
                candidates: tuple[str, ...] = AUTO_CANDIDATES, tokenizer_gguf: tuple[Path, list[int] | None] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(the chosen type, one row per type tried: type, bytes, perplexity, increase over F32, within budget).
    The trial files live in `workdir`/.auto-type.tmp-PID, removed after (or by the next export if killed)."""
    check_budget(budget)
    rows: list[dict[str, Any]] = []
    tmp = workdir / f".auto-type.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        f32 = tmp / "model-f32.gguf"
        with progress.step("Writing an F32 GGUF to compare against"):
            write_gguf_f32(source, f32, name="auto", tokenizer_gguf=tokenizer_gguf)
            reference = gguf_perplexity(f32, threads)
        rows.append({"type": "F32", "bytes": f32.stat().st_size, "perplexity": reference, "increase": 0.0, "within": True})
        with progress.bar("trying GGUF types", total=len(candidates)) as advance:
            for t in candidates:
                out = tmp / f"model-{t.lower()}.gguf"
                quantize_gguf(f32, out, t, threads=threads, log=tmp / f"{t}.log")
                ppl = gguf_perplexity(out, threads)
                rows.append({"type": t, "bytes": out.stat().st_size, "perplexity": ppl, "increase": ppl / reference - 1,
                             "within": ppl <= reference * (1 + budget)})
                out.unlink()
                advance(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows.sort(key=lambda r: r["bytes"])
    tried = [r for r in rows if r["type"] != "F32"]
    fits = [r for r in tried if r["within"]]
    if not fits:
        best = min(tried, key=lambda r: r["increase"])
        raise SlmkitError(f"no quantized type keeps perplexity within {100 * budget:.1f}% of F32 ({reference:.3f}); the closest is "
                          f"{best['type']} at {100 * best['increase']:+.1f}%", "Raise --ppl-budget, or pick --type F16.")
    return fits[0]["type"], rows


def describe(rows: list[dict[str, Any]], chosen: str, budget: float) -> str:
    """A table a person reads: every type tried, smallest first, the chosen one marked."""
    lines = [f"{'type':<8} {'size':>10} {'perplexity':>11} {'vs F32':>8}"]
    for r in rows:
        size = f"{r['bytes'] / 1e6:.1f} MB"
        mark = "  <- chosen" if r["type"] == chosen else ("" if r["within"] else f"  (over the {100 * budget:.0f}% budget)")
        lines.append(f"{r['type']:<8} {size:>10} {r['perplexity']:>11.3f} {100 * r['increase']:>+7.2f}%{mark}")
    return "\n".join(lines)
