"""An n-gram model as an engine (`slmkit ngram`; the math in ngram_ops.py): its ARPA file over a tokenizer's ids,
run, chatted with, scored, evaluated and served like any model. Every next-token distribution is the backoff
model's row after the last order-1 tokens: no weights, no KV, a few table lookups per token."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.engine import ngram_ops as ng
from slmkit.engine.backend import TokenScores, continuations_by_scoring, scores_from_rows
from slmkit.engine.decode import Step, decode_in_store, decode_loop, tokens_of
from slmkit.engine.hf_text import HfText
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import SlmkitError
from slmkit.sources.forms import NGRAM_FILE, NGRAM_KEY


def arpa_words(tokenizer: Any, vocab: int) -> list[str]:
    """The ARPA word of each id: the tokenizer's own token string (readable: 'Ġthe'), or `<id:N>` for every id
    when some token string is missing, repeated or holds whitespace (ARPA separates words by spaces)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    fine = all(t and not any(c.isspace() for c in t) for t in tokens) and len(set(tokens)) == vocab
    return list(tokens) if fine else [f"<id:{i}>" for i in range(vocab)]


class NgramStore:
    """The continuous batch of an n-gram model: each running row's tokens (its history is all the state it has)."""

    context = None
    chunked = False
    bursts = False
    checks = False

    def __init__(self, backend: "NgramBackend") -> None:
        self.backend = backend
        self.rows: list[list[int]] = []
        self._pending: list[int] | None = None

    def prefill(self, ids: list[int], reused: int, kv: Any, *, export: bool, **_: Any) -> tuple[torch.Tensor, None]:
        self._pending = list(ids)
        return self.backend.row(ids), None

    def prefill_many(self, items: list[tuple[list[int], int, Any, int]], *, export: bool) -> list[tuple[torch.Tensor, Any]]:
        raise NotImplementedError("an n-gram model prefills one request at a time (bursts is False)")

    def join(self) -> None:
        assert self._pending is not None
        self.rows.append(self._pending)
        self._pending = None

    def drop(self) -> None:
        self._pending = None

    def step(self, last: list[int]) -> torch.Tensor:
        for row, token in zip(self.rows, last):
            row.append(int(token))
        return torch.stack([self.backend.row(r) for r in self.rows])  # (B, V)

    def keep(self, rows: list[int]) -> list[int]:
        self.rows = [self.rows[r] for r in rows]
        return list(rows)

    def clear(self) -> None:
        self.rows, self._pending = [], None

    def close(self) -> None:
        self.clear()


class NgramBackend(HfText):
    """A backoff n-gram model (ngram_ops.NgramModel) with its tokenizer."""

    name = "ngram"
    prefix: list[int] = []

    def __init__(self, model: ng.NgramModel, tokenizer: Any, context_length: int) -> None:
        self.model, self.tokenizer, self._context = model, tokenizer, int(context_length)
        eos = tokenizer.eos_token_id
        self._eos = frozenset([eos] if isinstance(eos, int) else [])

    @classmethod
    def from_folder(cls, folder: Path) -> "NgramBackend":
        from transformers import AutoTokenizer, PretrainedConfig

        folder = Path(folder)
        info = json.loads((folder / "config.json").read_text())[NGRAM_KEY]
        # an empty config: the tokenizer's own files say its class (config.json describes no transformers model)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig(), trust_remote_code=False)
        index = {w: i for i, w in enumerate(arpa_words(tokenizer, info["vocab_size"]))}

        def word_id(w: str) -> int:
            if w not in index:
                raise SlmkitError(f"{folder / NGRAM_FILE} names {w!r}, which its tokenizer does not have",
                                  "The ARPA file and the tokenizer beside it must come from one `slmkit ngram` run: make the model again.")
            return index[w]

        try:
            model = ng.read_arpa(folder / NGRAM_FILE, info["vocab_size"], word_id)
        except ValueError as exc:
            raise SlmkitError(f"{folder.name}: {exc}", "Make the model again with slmkit ngram.") from None
        return cls(model, tokenizer, info["context_length"])

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self.model.vocab

    def row(self, ids: Sequence[int]) -> torch.Tensor:
        """log p(next | ids) over the vocabulary (V,)."""
        return torch.from_numpy(ng.dense_row(self.model, ids, np.float32))

    def logprob_rows(self, ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        return torch.from_numpy(np.stack([ng.dense_row(self.model, ids[: i + 1], np.float32) for i in range(len(ids) - 1)]))

    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
        return scores_from_rows(self.logprob_rows, requests)

    def score_continuations(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        return continuations_by_scoring(self.score_batch, prefix, continuations)

    def batch_store(self, slots: int, context: int | None = None) -> NgramStore:
        return NgramStore(self)

    def stream_steps(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[Step]:
        history = list(prompt_ids)

        def forward(token: int) -> torch.Tensor:
            history.append(int(token))
            return self.row(history)

        yield from decode_loop(self.row(history), forward, prompt_ids, params, max_new_tokens, self._eos)

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        return tokens_of(self.stream_steps(prompt_ids, params, max_new_tokens))

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int, *,
                       stop_at_eos: bool = True) -> list[list[Step]]:
        return decode_in_store(self.batch_store(len(prompts)), prompts, params, max_new_tokens, self._eos, stop_at_eos=stop_at_eos)

    def embed(self, texts: Sequence[str | Sequence[int]]) -> list[list[float]]:
        raise SlmkitError("an n-gram model has no hidden states to embed text with",
                          "Embed with a neural model (its teacher, for example).")
