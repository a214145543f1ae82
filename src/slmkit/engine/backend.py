"""The inference backend Protocol: the few operations the Model API needs from an engine.

A backend deals in token ids; text handling (templates aside), stop strings and streaming live above it, in
`slmkit.model`, so that PyTorch and llama.cpp backends share them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from typing import TYPE_CHECKING

from slmkit.engine.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


class TokenScores(list):
    """Log-probabilities of the scored tokens (a list of floats); `greedy` is True when every scored token was also
    the likeliest one at its position (lm-evaluation-harness's is_greedy, which LAMBADA's accuracy counts)."""

    def __init__(self, values: Sequence[float], greedy: bool) -> None:
        super().__init__(values)
        self.greedy = greedy


@runtime_checkable
class Backend(Protocol):
    name: str

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

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of one token (for showing log-probabilities)."""
        ...

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Format messages with the model's own chat template."""
        ...

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        """Yield sampled token ids one at a time (an EOS id is yielded too, then the stream ends)."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
        """For each (ids, start): log-probability of ids[i] given ids[:i], for i from start (>= 1) to the end,
        and whether each of those tokens was the argmax.

        Requests are scored together where the backend can batch them; the order of results matches.
        """
        ...

    def logprob_rows(self, ids: Sequence[int]) -> "torch.Tensor":
        """Log-softmax next-token distributions after each of ids[:-1]: shape (len(ids) - 1, vocab_size)."""
        ...
