"""How text becomes scoring requests (ids, start): the token splits lm-evaluation-harness uses."""

from __future__ import annotations

from slmkit.engine.backend import Backend


def document_prefix(backend: Backend) -> list[int]:
    """What a document is conditioned on: the tokenizer's own BOS if it adds one, else an EOS token
    (lm-evaluation-harness's prefix token), so that the first real token is scored too."""
    prefix = backend.encode("", add_special_tokens=True)
    if prefix:
        return prefix
    return [min(backend.eos_token_ids)] if backend.eos_token_ids else []


def encode_document(backend: Backend, text: str) -> tuple[list[int], int]:
    """ids = prefix + tokens of text; start = first scored position (every token of text is scored)."""
    prefix = document_prefix(backend)
    ids = backend.encode(text, add_special_tokens=True)
    if ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids, max(len(prefix), 1)


def encode_pair(backend: Backend, context: str, continuation: str) -> tuple[list[int], int]:
    """Score `continuation` given `context`, split as lm-evaluation-harness's _encode_pair does.

    Trailing spaces of the context move to the continuation; the whole string is encoded once and the
    tokens past the context's own encoding are the scored ones (so merges across the boundary count).
    """
    if not context:
        ids, start = encode_document(backend, continuation)
        return ids, start
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = backend.encode(context + continuation, add_special_tokens=True)
    ctx = backend.encode(context, add_special_tokens=True)
    start = len(ctx)
    if start >= len(whole):  # the continuation merged entirely into the context's last token
        raise ValueError(f"continuation {continuation!r} adds no tokens after context {context[-40:]!r}")
    return whole, max(start, 1)
