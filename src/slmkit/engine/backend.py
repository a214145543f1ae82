"""The inference backend Protocol: the few operations the Model API needs from an engine.

A backend deals in token ids; text handling (templates aside), stop strings and streaming live above it, in
`slmkit.model`, so that PyTorch and llama.cpp backends share them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from slmkit.engine.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from slmkit.engine.decode import Step


class TokenScores(list):
    """Log-probabilities of the scored tokens (a list of floats); `greedy` is True when every scored token was also
    the likeliest one at its position (lm-evaluation-harness's is_greedy, which LAMBADA's accuracy counts)."""

    def __init__(self, values: Sequence[float], greedy: bool) -> None:
        super().__init__(values)
        self.greedy = greedy


def scores_from_rows(logprob_rows: Callable[[Sequence[int]], "torch.Tensor"], requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
    """score_batch for an engine that scores one sequence at a time through its logprob_rows."""
    import torch

    out = []
    for ids, start in requests:
        rows = logprob_rows(ids)[start - 1 :]  # (n, V): predictions for ids[start:]
        targets = torch.tensor(list(ids[start:]))  # (n,)
        picked = rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append(TokenScores(picked.tolist(), bool((rows.argmax(-1) == targets).all())))
    return out


def continuations_by_scoring(score_batch: Callable[[Sequence[tuple[Sequence[int], int]]], list[TokenScores]], prefix: Sequence[int],
                             continuations: Sequence[Sequence[int]]) -> list[list[float]]:
    """score_continuations for an engine that keeps no prefix between requests: each continuation scored after the
    whole prefix."""
    return [list(s) for s in score_batch([(list(prefix) + list(c), len(prefix)) for c in continuations])]


class BatchStore(Protocol):
    """Where a continuous batch's KV lives (engine/torch_batch.py, engine/llamacpp_batch.py): rows 0..n-1 run."""

    context: int | None  # tokens per slot where the store limits it (llama.cpp), else None
    chunked: bool  # prefill takes `between` and `chunk`: a long prompt in pieces, decode steps of the others between
    bursts: bool  # prefill_many: several admitted requests prefilled in one forward (the lean forward's slots)
    checks: bool  # check: speculative drafts of several rows in one forward (the lean forward on slmkit's kernels)

    def prefill(self, ids: list[int], reused: int, kv: Any, *, export: bool) -> tuple["torch.Tensor", Any]:
        """Prefill `ids` (the first `reused` already in the prefix-cache entry `kv`) into the next free slot:
        the last position's logits (V,) and, if asked, the slot's KV for the prefix cache."""
        ...

    def prefill_many(self, items: list[tuple[list[int], int, Any, int]], *, export: bool) -> list[tuple["torch.Tensor", Any]]:
        """Where `bursts`: prefill several requests (ids, reused, kv, adapter) in one forward, each into its own slot."""
        ...

    def join(self) -> None:
        """The slot just prefilled joins the running rows."""
        ...

    def drop(self) -> None:
        """The slot just prefilled does not join (its request ended at its first token, or was cancelled)."""
        ...

    def step(self, last: list[int]) -> "torch.Tensor":
        """One decode step for every running row (its last token): logits (B, V)."""
        ...

    def check(self, rows: list[list[int]]) -> list["torch.Tensor"]:
        """Where `checks`: one step in which running row r runs rows[r] (its last token, then its drafts): the
        logits after each, (len(rows[r]), V) per row; forget() what a row refuses."""
        ...

    def forget(self, row: int, n: int) -> None:
        """Where `checks`: running row `row` forgets its last n tokens (drafts refused)."""
        ...

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only `rows`; returns the running rows' new order."""
        ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    prefix: list[int]  # token ids before every prompt (a prompt-tuned model's virtual tokens); empty for most

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus generated) the model attends to."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; parse_special False reads control-token strings such as <|im_end|> as plain text."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of one token (for showing log-probabilities)."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template (None for a base model)."""
        ...

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        """Format messages with the model's own chat template (with `tools`, OpenAI's function tools, for a template
        that has a tools section; assistant `tool_calls` and `tool` messages as the template takes them)."""
        ...

    def stream_steps(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator["Step"]:
        """Yield sampled tokens one at a time with their log-probabilities (engine/decode.py's loop; an EOS is
        yielded too, then the stream ends). Closing the iterator stops generation."""
        ...

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        """The token ids of stream_steps alone."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
        """For each (ids, start): log-probability of ids[i] given ids[:i], for i from start (>= 1) to the end,
        and whether each of those tokens was the argmax.

        Requests are scored together where the backend can batch them; the order of results matches.
        """
        ...

    def score_continuations(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probabilities of each continuation's tokens after the shared `prefix` (each continuation non-empty):
        the prefix is computed once, where the backend can (a label set scored after one prompt)."""
        ...

    def logprob_rows(self, ids: Sequence[int]) -> "torch.Tensor":
        """Log-softmax next-token distributions after each of ids[:-1]: shape (len(ids) - 1, vocab_size)."""
        ...

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int, *, stop_at_eos: bool = True
    ) -> "list[list[Step]]":
        """A static batch decoded together (row r samples with seed params.seed + r): each row's tokens with their
        log-probabilities."""
        ...

    def embed(self, texts: Sequence[str | Sequence[int]]) -> list[list[float]]:
        """Mean-pooled last hidden states after the final norm, L2-normalised: one vector per text."""
        ...

    def batch_store(self, slots: int, context: int | None = None) -> BatchStore:
        """Where a continuous-batching scheduler keeps the running batch's KV on this engine."""
        ...
