"""A quick perplexity on a small, fixed WikiText-2 sample: what quantize and export print after they run."""

from __future__ import annotations

from slmkit.evaluate.perplexity import perplexity, resolve_text
from slmkit.model import Model

SAMPLE_CHARS = 20000
SETTINGS = {"context_length": 512, "stride": 256, "limit": 4}


def quick_perplexity(model: Model) -> float:
    """Perplexity over 4 windows of 512 tokens from the start of wiki.test.raw (shipped inside slmkit)."""
    text = resolve_text("wikitext2").read_text(encoding="utf-8")[:SAMPLE_CHARS]
    return perplexity(model, text, **SETTINGS)["perplexity"]


def describe_delta(before: float, after: float) -> str:
    return (f"perplexity on a WikiText-2 sample (4 windows of 512 tokens): {before:.3f} -> {after:.3f} "
            f"({100 * (after - before) / before:+.2f}%)")
