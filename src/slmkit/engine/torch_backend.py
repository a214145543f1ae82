"""PyTorch backend: a transformers causal LM driven by our own decode loop with a KV cache."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slmkit.engine.backend import TokenScores
from slmkit.engine.decode import Step, decode_loop, decode_static_batch, tokens_of
from slmkit.engine.hf_text import HfText
from slmkit.engine.lean_forward import LeanForward, supports
from slmkit.engine.sampling import SamplingParams
from slmkit.sources import weights
from slmkit.sources.hf_dir import FALLBACK_CONTEXT


def cache_arg_of(model: Any) -> str:
    """The name of a transformers model's forward cache argument (past_key_values became cache in 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchBackend(HfText):
    """Runs a Hugging Face causal LM on the CPU: one prefill pass, then one token per forward with the cache."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, prefix: Sequence[int] = ()) -> None:
        self.model = model.eval()
        # token ids the model reads before every prompt: a prompt-tuned model's virtual tokens (layers/prompt.py);
        # callers never see them (not in prompts, histories or counts), only the context they take
        self.prefix = list(prefix)
        self.tokenizer = tokenizer
        eos = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(i) for i in source)
        self._eos = frozenset(eos)
        self.cache_arg = cache_arg_of(model)
        # Llama-layout models decode through a lean forward over a preallocated cache (engine/lean_forward.py)
        self.fast: LeanForward | None = LeanForward(model) if supports(model) else None

    @classmethod
    def from_folder(cls, folder: Path, *, threads: int | None = None) -> "TorchBackend":
        """Load safetensors weights and tokenizer from a store folder (no pickle, no remote code)."""
        if threads:
            torch.set_num_threads(threads)
        return cls(*weights.load(Path(folder)))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or FALLBACK_CONTEXT) - len(self.prefix)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        return tokens_of(self.stream_steps(prompt_ids, params, max_new_tokens))

    @torch.inference_mode()
    def stream_steps(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[Step]:
        """Prefill the prompt in one pass, then engine/decode.py's loop one token per forward with the cache: the
        lean Llama forward over a cache sized for prompt + answer up front, else transformers' with a DynamicCache."""
        prompt = torch.tensor([self.prefix + list(prompt_ids)], dtype=torch.long)  # (1, T)
        if self.fast is not None:
            fast = self.fast
            cache = fast.new_cache(1, capacity=prompt.shape[1] + max_new_tokens)
            first = fast.forward(cache, prompt)[0]  # (V,)
            forward = lambda token: fast.forward(cache, torch.tensor([[token]], dtype=torch.long))[0]  # noqa: E731
            if params.speculative:  # drafts checked in one pass (engine/speculative.py); the cache forgets the rejected
                yield from decode_loop(first, forward, prompt_ids, params, max_new_tokens, self._eos,
                                       verify=lambda tokens: fast.check(cache, 0, tokens), rollback=lambda n: cache.drop(0, n))
                return
        else:
            from transformers import DynamicCache

            kw = {self.cache_arg: DynamicCache(config=self.model.config), "use_cache": True, "logits_to_keep": 1}
            first = self.model(input_ids=prompt, **kw).logits[0, -1]  # (V,): only the last position's logits
            forward = lambda token: self.model(input_ids=torch.tensor([[token]], dtype=torch.long), **kw).logits[0, -1]  # noqa: E731
        yield from decode_loop(first, forward, prompt_ids, params, max_new_tokens, self._eos)

    def batch_store(self, slots: int, context: int | None = None) -> Any:
        """Where the scheduler keeps the running batch's KV: a preallocated slot cache for Llama-layout models, else a
        left-padded transformers cache. `context` applies to llama.cpp only."""
        from slmkit.engine.torch_batch import DynamicKV, SlotKV

        return SlotKV(self.fast, slots) if self.fast is not None else DynamicKV(self)

    @torch.inference_mode()
    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int, *, stop_at_eos: bool = True
    ) -> list[list[Step]]:
        """A static batch: left-padded prompts decoded together, one forward per step for all rows.

        Row r samples with seed `params.seed + r`. Finished rows keep computing (static batch) but stop growing.
        """
        from transformers import DynamicCache

        n, width = len(prompts), len(self.prefix) + max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, width), pad, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            p = self.prefix + list(prompt)
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        cache = DynamicCache(config=self.model.config)
        kw = {self.cache_arg: cache, "use_cache": True, "logits_to_keep": 1}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kw).logits[:, -1]  # (B, V)

        def step(tokens: list[int]) -> torch.Tensor:
            nonlocal mask, positions
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1  # (B, 1)
            step_ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(-1)  # (B, 1)
            return self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, **kw).logits[:, -1]

        return decode_static_batch(logits, step, prompts, params, max_new_tokens, self._eos, stop_at_eos=stop_at_eos)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str | Sequence[int]]) -> list[list[float]]:
        """Mean-pooled last hidden states, L2-normalised (one vector per text, or per list of token ids)."""
        out = []
        for text in texts:
            tokens = self.encode(text, add_special_tokens=True) if isinstance(text, str) else list(text)
            ids = torch.tensor([self.prefix + tokens], dtype=torch.long)
            hidden = self.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1][0, len(self.prefix):]  # (T, H)
            vec = hidden.float().mean(0)
            out.append((vec / vec.norm().clamp(min=1e-12)).tolist())
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def ll_tokenizer(self) -> Any:
        """llguidance's view of this vocabulary, for structured output (built once: about a second)."""
        if getattr(self, "_ll_tokenizer", None) is None:
            from llguidance.hf import from_tokenizer

            self._ll_tokenizer = from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos_token_ids))
        return self._ll_tokenizer

    @torch.inference_mode()
    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
        for ids, start in requests:
            if not 1 <= start <= len(ids):
                raise ValueError(f"start must be in [1, len(ids)]: got {start} for {len(ids)} ids")
        n = len(self.prefix)
        requests = [(self.prefix + list(ids), start + n) for ids, start in requests]
        width = max(len(ids) for ids, _ in requests)
        batch = torch.zeros((len(requests), width), dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, (ids, _) in enumerate(requests):
            batch[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, : len(ids)] = 1
        logits = self.model(input_ids=batch, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        out = []
        for row, (ids, start) in enumerate(requests):
            rows = logits[row, start - 1 : len(ids) - 1].float()  # (n, V): predictions for ids[start:]
            targets = batch[row, start : len(ids)].unsqueeze(-1)  # (n, 1)
            picked = rows.gather(-1, targets).squeeze(-1) - torch.logsumexp(rows, dim=-1)
            out.append(TokenScores(picked.tolist(), bool((rows.argmax(-1) == targets.squeeze(-1)).all())))
        return out

    @torch.inference_mode()
    def score_continuations(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        if not prefix or any(not c for c in continuations):
            raise ValueError("score_continuations needs a prefix and non-empty continuations")
        from transformers import DynamicCache

        ids = self.prefix + list(prefix)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), **{self.cache_arg: cache}, use_cache=True,
                         logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,): every continuation's first token
        scores = [[float(first[c[0]])] for c in continuations]
        # the continuations' inputs (each but its last token) as a tree of shared prefixes, run as one sequence after
        # the prefix's KV: each node at its own depth's position, attending to the prompt and its ancestors only (a
        # tree attention mask), so a label set sharing its first tokens ("card_arrival", "card_linking") computes
        # each shared token once and nothing is padded (banking77's 77 labels: 371 nodes instead of 77 x 17)
        node: dict[tuple[int, ...], int] = {}
        for c in continuations:
            for k in range(1, len(c)):
                node.setdefault(tuple(c[:k]), len(node))
        if not node:
            return scores
        n, p = len(node), len(ids)
        keys = list(node)
        attend = torch.zeros((1, 1, n, p + n), dtype=torch.bool)  # (B, heads, query, key): True attends
        attend[..., :p] = True
        for i, key in enumerate(keys):
            for k in range(1, len(key) + 1):
                attend[0, 0, i, p + node[key[:k]]] = True
        logits = self.model(input_ids=torch.tensor([[key[-1] for key in keys]], dtype=torch.long),
                            position_ids=torch.tensor([[p + len(key) - 1 for key in keys]], dtype=torch.long),
                            attention_mask=attend, **{self.cache_arg: cache}, use_cache=True).logits[0]  # (n, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, c in enumerate(continuations):
            scores[row] += [float(logp[node[tuple(c[:k])], c[k]]) for k in range(1, len(c))]
        return scores

    @torch.inference_mode()
    def logprob_rows(self, ids: Sequence[int]) -> torch.Tensor:
        n = len(self.prefix)
        logits = self.model(input_ids=torch.tensor([self.prefix + list(ids)], dtype=torch.long), use_cache=False).logits[0, n:-1]
        return torch.log_softmax(logits.float(), dim=-1)  # (T-1, V)

