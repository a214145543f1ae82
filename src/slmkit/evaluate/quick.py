"""A quick perplexity on a small, fixed WikiText-2 sample: what quantize and export print after they run."""

from __future__ import annotations

from slmkit.config import settings
from slmkit.evaluate.perplexity import perplexity, resolve_text
from slmkit.model import Model

SAMPLE_CHARS = 20000
SETTINGS = {"context_length": 512, "stride": 256, "limit": 4}


def quick_perplexity(model: Model) -> float | None:
    """Perplexity over 4 windows of 512 tokens from the start of wiki.test.raw; None without the data folder."""
    if settings().data_dir is None:
        return None
    text = resolve_text("wikitext2").read_text(encoding="utf-8")[:SAMPLE_CHARS]
    return perplexity(model, text, **SETTINGS)["perplexity"]


def describe_delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "(no data folder for the quick perplexity check; set SLMKIT_DATA, or pass --no-ppl)"
    return (f"perplexity on a WikiText-2 sample (4 windows of 512 tokens): {before:.3f} -> {after:.3f} "
            f"({100 * (after - before) / before:+.2f}%)")
