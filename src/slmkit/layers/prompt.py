"""A prompt-tuned model's learned prefix as token ids: the embedding table read through a layer that also knows N
virtual tokens (ids V .. V+N-1, one learned vector each, peft's `prompt_embeddings`). The engines then run the
prefix like any prompt tokens (the KV cache, the scheduler's prefix cache and chunked prefill need nothing new);
the output head keeps the V real tokens, so a virtual token can never be sampled."""

from __future__ import annotations

import torch
from torch import nn


class PromptEmbedding(nn.Module):
    """`base` (V, E) for ids < V; `prompt` (N, E) for ids V .. V+N-1."""

    def __init__(self, base: nn.Embedding, prompt: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.vocab = base.weight.shape[0]
        self.prompt = nn.Parameter(prompt.to(base.weight.dtype), requires_grad=False)  # (N, E)

    @property
    def weight(self) -> torch.Tensor:  # the real table: what the tied output head and dtype checks read
        return self.base.weight

    def virtual_ids(self) -> list[int]:
        return list(range(self.vocab, self.vocab + self.prompt.shape[0]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, E)
        virtual = ids >= self.vocab
        if not bool(virtual.any()):
            return self.base(ids)
        out = self.base(ids.masked_fill(virtual, 0))
        out[virtual] = self.prompt[ids[virtual] - self.vocab]
        return out


def attach_prompt(model: nn.Module, prompt: torch.Tensor) -> list[int]:
    """In place: give a transformers causal LM the virtual tokens of `prompt` (N, E); returns their ids."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layer = PromptEmbedding(inner.embed_tokens, prompt)
    inner.embed_tokens = layer
    return layer.virtual_ids()
