"""Divergence from a reference model (the teacher): mean KL(reference || model) and top-1 token agreement."""

from __future__ import annotations

from typing import Any

import torch

from slmkit import progress
from slmkit.engine.scoring import encode_document
from slmkit.errors import SlmkitError
from slmkit.model import Model

PROBES = ["Hello, world! 123", "The quick brown fox jumps over the lazy dog.", "naïve café — 東京 😀\n\tdef f(x): return x"]


def check_same_tokenizer(model: Model, reference: Model) -> None:
    """KL compares distributions over the same vocabulary, token by token; anything else is meaningless."""
    same = model.backend.vocab_size == reference.backend.vocab_size and all(
        model.backend.encode(p) == reference.backend.encode(p) for p in PROBES
    )
    if not same:
        raise SlmkitError(
            f"{model.name} and {reference.name} have different tokenizers, so their next-token distributions "
            "cannot be compared position by position (KL divergence needs the same vocabulary)",
            "Compare them with bits per byte instead, which does not depend on the tokenizer: "
            "slmkit eval MODEL --ppl FILE for each, then slmkit compare.",
        )


def kl_stats(ref_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(ref || model) in nats and top-1 agreement, from log-softmax rows (T, V)."""
    kl = (ref_logprobs.exp() * (ref_logprobs - model_logprobs)).sum(-1)  # (T,)
    agree = ref_logprobs.argmax(-1) == model_logprobs.argmax(-1)  # (T,)
    return kl, agree


def divergence(model: Model, reference: Model, text: str, *, context_length: int = 512, limit: int | None = None) -> dict[str, Any]:
    """Mean KL and top-1 agreement over non-overlapping windows of `text`."""
    check_same_tokenizer(model, reference)
    ctx = min(context_length, model.backend.context_length, reference.backend.context_length)
    ids, _ = encode_document(model.backend, text)
    chunks = [ids[i : i + ctx] for i in range(0, len(ids) - 1, ctx - 1) if len(ids[i : i + ctx]) > 1]
    if limit:
        chunks = chunks[:limit]
    kls, agrees = [], []
    with progress.bar(f"KL vs {reference.name}", total=len(chunks)) as advance:
        for chunk in chunks:
            kl, agree = kl_stats(reference.backend.logprob_rows(chunk), model.backend.logprob_rows(chunk))
            kls.append(kl)
            agrees.append(agree)
            advance(1)
    kl_all = torch.cat(kls)
    agree_all = torch.cat(agrees).float()
    return {
        "reference": reference.name,
        "tokens": int(kl_all.numel()),
        "mean_kl": float(kl_all.mean()),
        "median_kl": float(kl_all.median()),
        "max_kl": float(kl_all.max()),
        "top1_agreement": float(agree_all.mean()),
        "context_length": ctx,
    }
