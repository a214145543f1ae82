"""A mixture of specialists as one engine (`slmkit mix`; the math in mixture_ops.py): every specialist runs on its
own backend and KV; each next-token distribution is their weighted sum, the weights updated by Bayes after every
token of the prompt and of the answer. Text handling (tokenizer, chat template) is the first specialist's: they
share one tokenizer (checked when the mixture is made).

Specialists that are LoRA adapters of one base (on its lean forward) run as rows of one batch over the base: a
text's every position, a prefill and each decode step are one forward for all of them (SharedRows); otherwise each
runs on its own engine (SeparateRows). Costs: a prompt is read twice (once to score its tokens for the weights,
once into the KV the answer continues from) and every answer token runs every specialist; no prefix cache.
Embeddings are the first specialist's (the shared base's)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from slmkit.engine import mixture_ops as mo
from slmkit.engine.backend import Backend, TokenScores, continuations_by_scoring, scores_from_rows
from slmkit.engine.decode import Step, decode_in_store, decode_loop, tokens_of
from slmkit.engine.sampling import SamplingParams

POSITIONS_AT_ONCE = 128  # positions mixed per piece in logprob_rows: (piece, D, V) floats at a time


class SeparateRows:
    """The specialists' rows of a continuous batch when each runs on its own engine: one batch store each, in step."""

    def __init__(self, stores: list[Any]) -> None:
        self.stores = stores
        contexts = [s.context for s in stores if s.context is not None]
        self.context = min(contexts) if contexts else None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return torch.stack([s.prefill(ids, 0, None, export=False)[0].float() for s in self.stores])  # (D, V)

    def join(self) -> None:
        for s in self.stores:
            s.join()

    def drop(self) -> None:
        for s in self.stores:
            s.drop()

    def step(self, last: list[int]) -> torch.Tensor:
        return torch.stack([s.step(last).float() for s in self.stores], dim=1)  # (B, D, V)

    def keep(self, rows: list[int]) -> list[int]:
        orders = [s.keep(rows) for s in self.stores]  # the same order from each (one engine kind, one rule)
        assert all(o == orders[0] for o in orders), orders
        return orders[0]

    def clear(self) -> None:
        for s in self.stores:
            s.clear()

    def close(self) -> None:
        for s in self.stores:
            s.close()


class SharedRows:
    """The specialists' rows when they are LoRA adapters of one base (ids 1..D on its lean forward): a request is D
    consecutive slots of one slot cache, each with its adapter, and every prefill and decode step is one forward
    for all of them."""

    context = None

    def __init__(self, slots: Any, count: int) -> None:
        self.slots, self.d = slots, count

    def prefill(self, ids: list[int]) -> torch.Tensor:
        out = self.slots.prefill_many([(ids, 0, None, a) for a in range(1, self.d + 1)], export=False)
        for _ in range(self.d):
            self.slots.join()
        return torch.stack([o[0].float() for o in out])  # (D, V)

    def join(self) -> None:
        pass  # joined at prefill

    def drop(self) -> None:
        self.slots.keep(list(range(self.slots.rows - self.d)))

    def step(self, last: list[int]) -> torch.Tensor:
        logits = self.slots.step([t for t in last for _ in range(self.d)])  # (B * D, V)
        return logits.float().view(len(last), self.d, -1)  # (B, D, V)

    def keep(self, rows: list[int]) -> list[int]:
        order = self.slots.keep([r * self.d + a for r in rows for a in range(self.d)])
        requests = [order[i] // self.d for i in range(0, len(order), self.d)]
        assert order == [r * self.d + a for r in requests for a in range(self.d)], order  # whole requests move
        return requests

    def clear(self) -> None:
        self.slots.clear()

    def close(self) -> None:
        self.slots.close()


class MixtureStore:
    """The continuous batch of a mixture: the specialists' rows (SeparateRows or SharedRows) and each request's
    weights (D,) with the specialists' log-probabilities (D, V) of the token about to be chosen."""

    chunked = False
    bursts = False
    checks = False  # no speculative checks

    def __init__(self, mix: "MixtureBackend", kv: SeparateRows | SharedRows) -> None:
        self.mix, self.kv = mix, kv
        self.context = kv.context
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per running row: (log_w (D,), logprobs (D, V))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def prefill(self, ids: list[int], reused: int, kv: Any, *, export: bool, **_: Any) -> tuple[torch.Tensor, None]:
        lps = torch.log_softmax(self.kv.prefill(ids), -1)  # (D, V)
        log_w = self.mix.weights_after(ids)  # (D,)
        self._pending = (log_w, lps)
        return mo.mixed(log_w, lps), None  # no KV for the prefix cache: the weights depend on the whole prompt

    def prefill_many(self, items: list[tuple[list[int], int, Any, int]], *, export: bool) -> list[tuple[torch.Tensor, Any]]:
        raise NotImplementedError("a mixture prefills one request at a time (bursts is False)")

    def join(self) -> None:
        self.kv.join()
        assert self._pending is not None
        self.rows.append(self._pending)
        self._pending = None

    def drop(self) -> None:
        self.kv.drop()
        self._pending = None

    def step(self, last: list[int]) -> torch.Tensor:
        prior, share = self.mix.prior, self.mix.share
        log_w = torch.stack([mo.update(w, lp[:, t].double(), prior, share) for (w, lp), t in zip(self.rows, last)])  # (B, D)
        lps = torch.log_softmax(self.kv.step(last), -1)  # (B, D, V)
        self.rows = [(log_w[r], lps[r]) for r in range(len(last))]
        return mo.mixed(log_w, lps)  # (B, V)

    def keep(self, rows: list[int]) -> list[int]:
        order = self.kv.keep(rows)
        self.rows = [self.rows[r] for r in order]
        return order

    def clear(self) -> None:
        self.kv.clear()
        self.rows, self._pending = [], None

    def close(self) -> None:
        self.kv.close()


class MixtureBackend:
    """Specialists (open backends sharing a tokenizer) mixed by total probability; `prior` (D,) and `share` as in
    mixture_ops.update."""

    name = "mixture"
    prefix: list[int] = []

    def __init__(self, specialists: list[Backend], prior: Sequence[float] | None = None, share: float = 0.0,
                 names: Sequence[str] = (), *, shared: Any = None) -> None:
        """`shared`: instead of `specialists`, a PyTorch backend of their common base holding them as LoRA adapters
        1..len(names) on its lean forward (one batched forward for all)."""
        count = len(names) if shared is not None else len(specialists)
        if count == 0 or (shared is not None and specialists):
            raise ValueError("a mixture needs specialists: backends, or a shared base and their names")
        self.specialists, self.shared, self.share = specialists, shared, float(share)
        self.names = list(names) or [f"specialist {i}" for i in range(count)]
        self.prior = mo.log_prior(prior, count)
        self.first = shared if shared is not None else specialists[0]

    # text handling: the first specialist's (one tokenizer for all)
    @property
    def context_length(self) -> int:
        return min(s.context_length for s in self.specialists or [self.shared])

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.first.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self.first.has_chat_template

    @property
    def chat_template(self) -> str | None:
        return self.first.chat_template

    @property
    def vocab_size(self) -> int:
        return self.first.vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        return self.first.encode(text, add_special_tokens=add_special_tokens, parse_special=parse_special)

    def decode(self, ids: Sequence[int]) -> str:
        return self.first.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.first.token_text(token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        return self.first.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def embed(self, texts: Sequence[str | Sequence[int]]) -> list[list[float]]:
        return self.first.embed(texts)

    # the mixture itself
    def token_lls(self, ids: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each specialist's log-probability of each of ids[1:] (T-1, D), and their rows (T-1, V) each."""
        if self.shared is not None:  # one forward, a row per adapter, the logits after every position
            fast, d = self.shared.fast, len(self.names)
            cache = fast.new_cache(d, capacity=len(ids))
            cache.adapter[:d] = range(1, d + 1)
            with torch.inference_mode():
                every = fast.forward(cache, torch.tensor([list(ids[:-1])] * d), every=True)  # (D, T-1, V)
            rows = list(torch.log_softmax(every.float(), -1))
        else:
            rows = [s.logprob_rows(ids).float() for s in self.specialists]
        target = torch.tensor(list(ids[1:])).unsqueeze(-1)  # (T-1, 1)
        return torch.stack([r.gather(-1, target).squeeze(-1) for r in rows], dim=-1), rows

    def weights_after(self, ids: Sequence[int]) -> torch.Tensor:
        """p(d | ids) in log space (D,): the prior updated by every token after the first."""
        if len(ids) < 2:
            return self.prior.clone()
        lls, _ = self.token_lls(ids)
        w = mo.weights_along(lls, self.prior, self.share)[-1]
        return mo.update(w, lls[-1].double(), self.prior, self.share)

    def weights(self, ids: Sequence[int]) -> dict[str, float]:
        """The domain weights after `ids`, by specialist name (what `--verbose` and the API show)."""
        return {n: float(p) for n, p in zip(self.names, self.weights_after(ids).exp().tolist())}

    def logprob_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """The mixture's log-softmax distributions after each of ids[:-1] (T-1, V), each position with the weights
        the text before it gave."""
        lls, rows = self.token_lls(ids)
        log_w = mo.weights_along(lls, self.prior, self.share)  # (T-1, D)
        stacked = torch.stack(rows, dim=1)  # (T-1, D, V)
        return torch.cat([mo.mixed(log_w[i:i + POSITIONS_AT_ONCE], stacked[i:i + POSITIONS_AT_ONCE])
                          for i in range(0, len(log_w), POSITIONS_AT_ONCE)])

    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
        return scores_from_rows(self.logprob_rows, requests)

    def score_continuations(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        return continuations_by_scoring(self.score_batch, prefix, continuations)

    def batch_store(self, slots: int, context: int | None = None) -> MixtureStore:
        if self.shared is not None:
            return MixtureStore(self, SharedRows(self.shared.batch_store(slots * len(self.names)), len(self.names)))
        return MixtureStore(self, SeparateRows([s.batch_store(slots, context) for s in self.specialists]))

    def stream_steps(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[Step]:
        store = self.batch_store(1, len(prompt_ids) + max_new_tokens)
        try:
            first, _ = store.prefill(list(prompt_ids), 0, None, export=False)
            store.join()
            yield from decode_loop(first, lambda token: store.step([token])[0], prompt_ids, params, max_new_tokens,
                                   self.eos_token_ids)
        finally:
            store.close()

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        return tokens_of(self.stream_steps(prompt_ids, params, max_new_tokens))

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int, *,
                       stop_at_eos: bool = True) -> list[list[Step]]:
        store = self.batch_store(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        return decode_in_store(store, prompts, params, max_new_tokens, self.eos_token_ids, stop_at_eos=stop_at_eos)
