"""Structured output: a grammar enforced token by token while sampling, by llguidance (the constraint engine behind
Guidance and several inference servers): the tokens the grammar cannot accept next get -inf before sampling, so the
answer is valid by construction (JSON for a JSON schema or any JSON object, or a regex's language).

A `Constraint` belongs to one sequence (it tracks where in the grammar it is); the decode loop calls `mask` on the
logits before sampling and `advance` with the token picked. Engines provide `ll_tokenizer()` (llguidance's view of
their vocabulary, built once per backend)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from slmkit.errors import SlmkitError

_BITS = torch.arange(32, dtype=torch.int32)
# one layout (json.dumps's): a small model does not spend its tokens on whitespace (a schema's x-guidance overrides)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(SlmkitError):
    pass


def grammar_for(response_format: dict[str, Any]) -> str | None:
    """llguidance grammar text for an OpenAI `response_format` (None for plain text)."""
    from llguidance import LLMatcher

    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("response_format json_schema needs json_schema.schema, a JSON schema object",
                               'For example {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}.')
    elif kind == "regex":  # not OpenAI's; vLLM's guided_regex and llama.cpp's grammars have the like
        return LLMatcher.grammar_from_regex(str(response_format.get("regex", "")))
    else:
        raise GrammarError(f"unknown response_format type {kind!r}", "Types: text, json_object, json_schema.")
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not usable: {exc}", "Fix the schema.") from exc


class Constraint:
    """One sequence's place in a grammar."""

    def __init__(self, tokenizer: Any, grammar: str, vocab_size: int) -> None:
        from llguidance import LLMatcher

        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar is not usable: {self.matcher.get_error()}", "Fix the schema or pattern.")
        self.vocab_size = vocab_size
        self.bits = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    def mask(self, row: torch.Tensor) -> None:
        """Set the logits (V,) of every token the grammar cannot take next to -inf, in place."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bits)
        words = torch.from_numpy(self.bits[0])  # (V/32,) int32, bit i of word w: token 32w + i allowed
        allowed = ((words[:, None] >> _BITS) & 1).reshape(-1)[: row.shape[-1]].bool()  # (V,)
        row.masked_fill_(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))


def constraint_for(backend: Any, response_format: dict[str, Any] | None) -> Constraint | None:
    """The constraint a request's response_format asks for on this backend (None for free text)."""
    if not response_format:
        return None
    grammar = grammar_for(response_format)
    if grammar is None:
        return None
    return Constraint(backend.ll_tokenizer(), grammar, backend.vocab_size)
