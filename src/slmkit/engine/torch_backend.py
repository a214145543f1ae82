"""PyTorch backend: a transformers causal LM driven by our own decode loop with a KV cache."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slmkit.engine.sampling import SamplingParams, sample_next
from slmkit.errors import SlmkitError


class TorchBackend:
    """Runs a Hugging Face causal LM on the CPU: one prefill pass, then one token per forward with the cache."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(i) for i in source)
        self._eos = frozenset(eos)
        # transformers renamed the forward's cache argument (past_key_values -> cache) in 5.x
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_folder(cls, folder: Path, *, threads: int | None = None) -> "TorchBackend":
        """Load safetensors weights and tokenizer from a store folder (no pickle, no remote code)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype="auto", use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise SlmkitError(
                f"could not load the model in {folder}: {exc}",
                "The store folder may be damaged: remove it (slmkit models rm NAME) and import it again.",
            ) from exc
        return cls(model, tokenizer)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise SlmkitError(
                "this model has no chat template (it is probably a base model)",
                "Use plain completion instead: slmkit run --raw, or Model.generate().",
            )
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @torch.inference_mode()
    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        from transformers import DynamicCache

        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else _random_seed())
        cache = DynamicCache(config=self.model.config)
        history = list(prompt_ids)
        input_ids = torch.tensor([history], dtype=torch.long)  # (1, T)
        # prefill: the whole prompt in one pass, keep only the last position's logits
        cache_kw = {self._cache_arg: cache, "use_cache": True, "logits_to_keep": 1}
        logits = self.model(input_ids=input_ids, **cache_kw).logits
        for _ in range(max_new_tokens):
            token = sample_next(logits[0, -1], params, history, generator)  # logits: (1, 1, V)
            yield token
            if token in self._eos:
                return
            history.append(token)
            step = torch.tensor([[token]], dtype=torch.long)  # (1, 1)
            logits = self.model(input_ids=step, **cache_kw).logits

    @torch.inference_mode()
    def token_logprobs(self, ids: Sequence[int], start: int) -> list[float]:
        if start < 1:
            raise ValueError("start must be >= 1: the first token has no context to be scored against")
        input_ids = torch.tensor([list(ids)], dtype=torch.long)  # (1, T)
        logits = self.model(input_ids=input_ids, use_cache=False).logits[0, start - 1 : -1].float()  # (T-start, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = input_ids[0, start:].unsqueeze(-1)  # (T-start, 1)
        return logprobs.gather(-1, targets).squeeze(-1).tolist()


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
