"""The decode loop, once for every engine: sample from the logits after the prompt, hand out the token with its
log-probability, feed it back, repeat until EOS or the budget. PyTorch (lean Llama forward or transformers'),
llama.cpp and the continuous-batching scheduler all produce `Step`s through the functions here (one loop per mode:
one sequence, with speculation; a static batch; the scheduler's rows through `steps_of`), so the server's
logprobs and routing on confidence read what generation computed (no second forward pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from slmkit.engine.sampling import GREEDY_BELOW, Candidates, SamplingParams, candidates, log_norms, make_generator, next_distribution, sample_next, sample_rows
from slmkit.engine.speculative import PromptLookup, Throttle


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token and its log-probability under the model's own next-token distribution (before
    temperature, top-k/top-p or the repetition penalty reshape it: what OpenAI's logprobs report);
    `top` holds the params.top_logprobs likeliest tokens as (id, log-probability), most likely first. Speculative
    decoding marks the first token after each check with the drafts it checked (`checked`) and every kept draft
    (`drafted`)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    drafted: bool = False
    checked: int = 0


def steps_of(logits: torch.Tensor, tokens: Sequence[int], top_n: Sequence[int], cands: Candidates | None = None) -> list[Step]:
    """Steps for the tokens sampled from each row of logits (B, V); row r keeps its top_n[r] alternatives. `cands`:
    sampling's candidates of the same logits, whose logsumexp each row's log-probability reuses."""
    rows = logits.float()
    norm = log_norms(rows) if cands is None else cands.norm  # (B,)
    chosen = (rows[torch.arange(len(tokens)), torch.tensor(list(tokens))] - norm).tolist()  # (B,)
    out = []
    for r, (token, lp) in enumerate(zip(tokens, chosen)):
        top: tuple[tuple[int, float], ...] = ()
        if top_n[r]:
            vals, ids = torch.topk(rows[r], top_n[r])
            top = tuple(zip(ids.tolist(), (vals - norm[r]).tolist()))
        out.append(Step(int(token), float(lp), top))
    return out


def decode_loop(
    first: torch.Tensor, forward: Callable[[int], torch.Tensor], prompt_ids: Sequence[int], params: SamplingParams,
    max_new_tokens: int, eos: frozenset[int], *, verify: Callable[[list[int]], torch.Tensor] | None = None,
    rollback: Callable[[int], None] | None = None,
) -> Iterator[Step]:
    """One sequence: `first` is the logits (V,) after the prompt, `forward(token)` runs one token and returns the
    next logits (V,). Yields every token, an EOS included, then stops.

    Speculative (params.speculative > 0, no grammar, and the engine gives `verify(tokens)` -> logits (n, V) after
    each of n tokens run at once, and `rollback(n)` forgetting the last n): after each token, prompt-lookup drafts are
    checked in the same forward pass. Greedy keeps a draft while it is the token greedy decoding picks (the same
    tokens); sampling keeps it with its probability under the sampling settings and, at the first refusal, draws from
    that distribution without it (Leviathan et al.'s rule for a draft that is one token for sure: the same distribution
    of texts, not the same draws for a seed). Where checks cost more per token than plain steps (little of the output
    repeats the context), drafting pauses (speculative.Throttle)."""
    generator = make_generator(params.seed)
    history = list(prompt_ids)
    logits = first
    speculate = bool(params.speculative and params.constraint is None and verify and rollback)
    drafts = PromptLookup(prompt_ids) if speculate else None
    throttle = Throttle()
    made, chosen, checked = 0, None, 0  # chosen: the next token, already drawn by a check; checked: its drafts
    while made < max_new_tokens:
        cands = candidates(logits[None], [params], [history]) if chosen is None else None
        token = chosen if chosen is not None else sample_rows(logits[None], [params], [history], [generator], cands)[0]
        chosen = None
        step = steps_of(logits[None], [token], [params.top_logprobs], cands)[0]
        yield replace(step, checked=checked) if checked else step
        made += 1
        if token in eos or made == max_new_tokens:
            return
        history.append(token)
        if drafts is None:
            logits = forward(token)
            continue
        t0 = time.perf_counter()  # each mode's time, its lookup included and the consumer's (yields) not
        drafts.push(token)
        draft = drafts.draft(min(params.speculative, max_new_tokens - made - 1)) if throttle.allow() else []
        checked = len(draft)
        if not draft:
            logits = forward(token)
            throttle.plain(time.perf_counter() - t0)
            continue
        rows = verify([token, *draft])  # (1 + len(draft), V): the logits after the token and after each draft
        kept: list[int] = []
        for row, proposed in zip(rows, draft):
            accepted, chosen = check_draft(row, proposed, params, history, generator)
            if not accepted:
                break
            kept.append(proposed)
            history.append(proposed)
            if proposed in eos:
                break
        rollback(len(draft) - len(kept))
        throttle.checked(time.perf_counter() - t0, len(draft), len(kept))
        for i, (row, proposed) in enumerate(zip(rows, kept)):
            yield replace(steps_of(row[None], [proposed], [params.top_logprobs])[0], drafted=True, checked=checked * (i == 0))
            made += 1
            drafts.push(proposed)
        if kept:
            checked = 0
            if kept[-1] in eos:
                return
        logits = rows[len(kept)]


def check_draft(logits: torch.Tensor, proposed: int, params: SamplingParams, history: list[int],
           generator: torch.Generator | None) -> tuple[bool, int | None]:
    """Is the drafted token kept after `history`? (kept, the token drawn instead when sampling refuses it)."""
    if params.temperature < GREEDY_BELOW:
        return sample_next(logits, params, history, generator) == proposed, None
    candidates, probs = next_distribution(logits, params, history)
    at = candidates == proposed
    if float(torch.rand((), generator=generator)) < float(probs[at].sum()):
        return True, None
    rest = probs.masked_fill(at, 0.0)
    return False, int(candidates[torch.multinomial(rest, 1, generator=generator)])


def decode_static_batch(
    logits: torch.Tensor, step: Callable[[list[int]], torch.Tensor], prompts: Sequence[Sequence[int]],
    params: SamplingParams, max_new_tokens: int, eos: frozenset[int], *, stop_at_eos: bool = True,
) -> list[list[Step]]:
    """A static batch: `logits` (B, V) after the prompts, `step(tokens)` runs one token per row and returns the next
    logits (B, V). Each row's Steps (with log-probabilities, as decode_loop's); row r samples with seed
    `params.seed + r`; finished rows keep computing (static batch) but stop growing."""
    n = len(prompts)
    base_seed = params.seed if params.seed is not None else make_generator(None).initial_seed()
    gens: list[torch.Generator | None] = [make_generator(base_seed, r) for r in range(n)]
    histories = [list(p) for p in prompts]
    outputs: list[list[Step]] = [[] for _ in prompts]
    done = [False] * n
    for _ in range(max_new_tokens):
        cands = candidates(logits, [params] * n, histories)
        tokens = sample_rows(logits, [params] * n, histories, gens, cands)  # (B,)
        for r, s in enumerate(steps_of(logits, tokens, [params.top_logprobs] * n, cands)):
            if not done[r]:
                outputs[r].append(s)
                histories[r].append(s.token)
                done[r] = stop_at_eos and s.token in eos
        if all(done):
            break
        logits = step(tokens)
    return outputs


def decode_in_store(store: Any, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int,
                    eos: frozenset[int], *, stop_at_eos: bool = True) -> list[list[Step]]:
    """A static batch through a batch store (engine/backend.BatchStore) made for it: each prompt prefilled into its
    own row, then decode_static_batch; the store is closed after."""
    try:
        firsts = []
        for p in prompts:
            firsts.append(store.prefill(list(p), 0, None, export=False)[0])
            store.join()
        return decode_static_batch(torch.stack(firsts), store.step, prompts, params, max_new_tokens, eos, stop_at_eos=stop_at_eos)
    finally:
        store.close()


def tokens_of(steps: Generator[Step, None, None]) -> Iterator[int]:
    """Only the token ids of a step stream (closing this closes the stream)."""
    try:
        for step in steps:
            yield step.token
    finally:
        steps.close()
