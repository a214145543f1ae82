"""Perplexity over a text file with a sliding window; also bits per byte, which compares across tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmkit.data.catalog import DATASETS
from slmkit.data.locate import locate
from slmkit.engine.scoring import encode_document
from slmkit.errors import SlmkitError
from slmkit.evaluate.batching import score_requests
from slmkit.evaluate.metrics import bits_per_byte, perplexity_from_nll, sliding_windows
from slmkit.model import Model

CONTEXT_LENGTH = 1024  # tokens a window feeds the model
STRIDE = 512  # new tokens each window scores (each with at least CONTEXT_LENGTH - STRIDE tokens of context)
BUILTIN_TEXTS = [name for name, d in DATASETS.items() if d.text_field]  # raw-text corpora of the catalog


def resolve_text(name_or_path: str, *, data_dir: Path | None = None) -> Path:
    """A built-in text by name (wikitext2: the test split, found by slmkit.data.locate) or a file path."""
    if name_or_path in BUILTIN_TEXTS:
        return locate(name_or_path, data_dir=data_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise SlmkitError(f"no such text file: {path}", f"Give a UTF-8 text file, or one of: {', '.join(BUILTIN_TEXTS)}")
    return path


def perplexity(
    model: Model, text: str, *, context_length: int = CONTEXT_LENGTH, stride: int = STRIDE, limit: int | None = None
) -> dict[str, Any]:
    """Token perplexity and bits per byte of `text`; `limit` scores only the first `limit` windows."""
    if not text.strip():
        raise SlmkitError("the text to score is empty", "Give a non-empty text file.")
    ctx = min(context_length, model.backend.context_length)
    stride = min(stride, ctx - 1)
    ids, _ = encode_document(model.backend, text)
    windows = sliding_windows(len(ids), ctx, stride)
    if limit:
        windows = windows[:limit]
    requests = [(ids[b:e], s - b) for b, e, s in windows]
    scores = score_requests(model.backend, requests, description="perplexity", max_tokens=2 * ctx)
    nll = -sum(sum(s) for s in scores)
    n_tokens = sum(len(s) for s in scores)
    scored_to = windows[-1][1]
    complete = scored_to == len(ids)
    # bytes of the scored text: all of it, or (under --limit) the bytes its scored tokens decode to
    n_bytes = len(text.encode("utf-8")) if complete else len(model.backend.decode(ids[1:scored_to]).encode("utf-8"))
    return {
        "tokens": n_tokens,
        "bytes": n_bytes,
        "complete": complete,
        "context_length": ctx,
        "stride": stride,
        "windows": len(windows),
        "nll": nll,
        "perplexity": perplexity_from_nll(nll, n_tokens),
        "bits_per_byte": bits_per_byte(nll, n_bytes),
    }
