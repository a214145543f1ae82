"""Sampling settings and the pure math that turns next-token logits into a token id."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from slmkit.errors import SlmkitError


MAX_SEED = 2**62  # seeds are offset per row and per choice; this leaves room and fits torch's 64-bit generator
# Bounds that keep the arithmetic finite: logits divided by a temperature below GREEDY_BELOW overflow float32 (such a
# temperature samples greedily, as its limit does); a repetition penalty outside PENALTY_RANGE turns logits into
# infinities or zeros.
GREEDY_BELOW = 1e-4
PENALTY_RANGE = (0.01, 100.0)
MAX_REPEAT_LAST_N = 1 << 20


class RowsFailed(SlmkitError):
    """Some rows of a batch could not be sampled (their scores were not finite numbers); the others were. `failed`:
    row -> why; `tokens`: every row's token (0 for the failed ones)."""

    def __init__(self, failed: dict[int, str], tokens: list[int]) -> None:
        first = next(iter(failed.values()))
        super().__init__(f"could not sample the next token: {first}",
                         "Use less extreme sampling settings (temperature, penalties), or report the model and prompt.")
        self.failed, self.tokens = failed, tokens


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The defaults here are the only defaults (CLI and API read them from here).

    temperature 0 means greedy decoding. `seed` fixes the random stream: the same seed, prompt and model
    give the same output.
    """

    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    top_logprobs: int = 0  # the likeliest alternatives each generated token reports with its log-probability
    min_p: float = 0.0  # keep tokens at least this share of the likeliest one's probability (0 turns it off)
    # OpenAI's additive penalties over the same last repeat_last_n tokens (llama.cpp's server counts the same way)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # speculative decoding by prompt lookup (engine/speculative.py): up to this many drafted tokens checked per forward
    # pass (no grammar); greedy: the same tokens as without it; sampling: the same distribution. 0 turns it off
    speculative: int = 0
    # structured output: one sequence's grammar state (engine/constrained.py); masks the logits before sampling
    constraint: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if any(math.isnan(x) or math.isinf(x) for x in (self.temperature, self.top_p, self.repetition_penalty, self.min_p,
                                                          self.frequency_penalty, self.presence_penalty)):
            problems.append("temperature, top_p, min_p and the penalties must be finite numbers")
        if not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2):
            problems.append("frequency_penalty and presence_penalty must be in [-2, 2]")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be in [0, {MAX_SEED}]")
        if self.temperature < 0:
            problems.append("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0 (0 turns it off)")
        if not 0 <= self.speculative <= 16:
            problems.append("speculative must be in [0, 16] (drafted tokens per check; 0 turns it off)")
        if not PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1]:
            problems.append(f"repetition_penalty must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]:g}] (1 turns it off)")
        if not -1 <= self.repeat_last_n <= MAX_REPEAT_LAST_N:
            problems.append(f"repeat_last_n must be in [-1, {MAX_REPEAT_LAST_N}] (0 or -1: the whole text so far)")
        if self.max_tokens < 1:
            problems.append("max_tokens must be >= 1")
        if not 0 <= self.top_logprobs <= 20:
            problems.append("top_logprobs must be in [0, 20]")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise SlmkitError("bad sampling settings: " + "; ".join(problems), "Fix the values and try again.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """Build from keyword arguments, ignoring None (so callers pass only what the user set)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SlmkitError(f"unknown sampling setting(s): {', '.join(unknown)}", f"Known: {', '.join(sorted(known))}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        if "stop" in given:
            stop = given["stop"]
            given["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(replace(self, constraint=None)).items() if k != "constraint"}


def make_generator(seed: int | None, offset: int = 0) -> torch.Generator:
    """The random stream for one sequence: `seed + offset` when seeded (reproducible), else a fresh random seed."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 62) - 1)
    return torch.Generator().manual_seed(seed + offset)


def apply_repetition_penalty(logits: torch.Tensor, recent: Sequence[Sequence[int]], penalties: Sequence[float]) -> torch.Tensor:
    """CTRL-style penalty, in place: in row r, divide positive logits (multiply negative ones) of the tokens in
    recent[r] by penalties[r].  logits: (B, V)"""
    rows, ids, pens = [], [], []
    for r, (window, penalty) in enumerate(zip(recent, penalties)):
        if penalty != 1.0 and window:
            seen = sorted(set(window))
            rows += [r] * len(seen)
            ids += seen
            pens += [penalty] * len(seen)
    if rows:
        at = (torch.tensor(rows), torch.tensor(ids))
        picked = logits[at]
        pen = torch.tensor(pens, dtype=logits.dtype)
        logits[at] = torch.where(picked > 0, picked / pen, picked * pen)
    return logits


def apply_additive_penalties(logits: torch.Tensor, recent: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> torch.Tensor:
    """OpenAI's penalties, in place: in row r, subtract frequency_penalty x (times a token occurs in recent[r]) and
    presence_penalty x (whether it occurs at all).  logits: (B, V)"""
    for r, (window, p) in enumerate(zip(recent, params)):
        if (p.frequency_penalty or p.presence_penalty) and window:
            ids, counts = torch.unique(torch.tensor(list(window)), return_counts=True)
            logits[r, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row and their token ids, largest first (all of them, sorted, when k is 0).
    logits: (..., V) -> (..., k), (..., k)"""
    if 0 < k < logits.shape[-1]:
        return torch.topk(logits, k)
    return torch.sort(logits, descending=True)


def nucleus_size(sorted_logits: torch.Tensor, p: float) -> int:
    """How many of the top tokens (logits sorted descending) to keep so their probability mass reaches p."""
    if p >= 1.0:
        return sorted_logits.numel()
    probs = torch.softmax(sorted_logits, dim=-1)
    # a token is kept while the mass before it is still below p, so the top token always stays
    before = torch.cumsum(probs, dim=-1) - probs
    return max(int((before < p).sum()), 1)


def penalty_window(history: Sequence[int], params: SamplingParams) -> Sequence[int]:
    """The recent tokens the penalties look at."""
    return history[-params.repeat_last_n :] if params.repeat_last_n > 0 else history


def row_distribution(values: torch.Tensor, ids: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled row's last steps: `values` (k,) its candidates' logits already divided by the temperature, largest
    first, `ids` (k,) their tokens -> (tokens, probabilities) after top-p and min-p (not renormalized after min-p:
    multinomial does that)."""
    keep = nucleus_size(values, params.top_p)
    probs = torch.softmax(values[:keep], dim=-1)
    if params.min_p > 0:  # drop what is less likely than min_p x the likeliest
        probs = torch.where(probs >= params.min_p * probs[0], probs, torch.zeros_like(probs))
    return ids[:keep], probs


def next_distribution(logits: torch.Tensor, params: SamplingParams, history: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What sample_next draws from at temperature > 0 for one row of logits (V,) (no grammar): (candidate tokens,
    probabilities summing to 1). A speculative check accepts a drafted token with its probability here."""
    row = logits.float()[None].clone()  # (1, V)
    window = penalty_window(history, params)
    apply_repetition_penalty(row, [window], [params.repetition_penalty])
    apply_additive_penalties(row, [window], [params])
    values, ids = top_candidates(row[0], params.top_k)
    candidates, probs = row_distribution(values / params.temperature, ids, params)
    return candidates, probs / probs.sum()


def _not_finite(value: torch.Tensor) -> bool:
    return not bool(torch.isfinite(value))


MAX_CANDIDATES = 512  # the most candidates per row `candidates` keeps; a wider top-k sorts the row as before


@dataclass(frozen=True)
class Candidates:
    """What sampling reads of each row of raw logits (B, V), from one pass over it (native.top_logsumexp): its m
    largest values and their ids, largest first, m covering every row's top-k (greedy: 1) plus its penalty window;
    and its logsumexp (a Step's log-probability)."""

    values: torch.Tensor  # (B, m)
    ids: torch.Tensor  # (B, m)
    norm: torch.Tensor  # (B,)


def log_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's logsumexp (B, V) -> (B,): slmkit's kernel where built (the very numbers `candidates` gives, so a
    token's log-probability does not depend on the path that sampled it), else torch's."""
    from slmkit import native

    kernels = native.ops() if rows.dim() == 2 and rows.dtype == torch.float32 else None
    return torch.logsumexp(rows, dim=-1) if kernels is None else kernels.top_logsumexp(rows, 1)[2]


def _penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def candidates(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]]) -> Candidates | None:
    """Candidates of every row where slmkit's kernel applies (built; float32 rows; every row greedy or with a top-k,
    none with a grammar; every score finite), else None: sample_rows and steps_of then read whole rows as before.
    The penalties change only the tokens of a row's window, so its k best after them are among the raw k + |window|
    best and the window's own: sample_rows re-ranks those few instead of copying and sorting the row (a 262k
    vocabulary: 16 rows 10 -> ~3 ms a step)."""
    from slmkit import native

    if logits.dim() != 2 or logits.dtype != torch.float32 or any(p.constraint is not None for p in params):
        return None
    m = 0
    for h, p in zip(histories, params):
        k = 1 if p.temperature < GREEDY_BELOW else p.top_k
        if k <= 0:
            return None
        m = max(m, k + (len(set(penalty_window(h, p))) if _penalized(p) else 0))
    kernels = native.ops()
    if kernels is None or m > min(MAX_CANDIDATES, logits.shape[-1] // 4):
        return None
    values, ids, norm, finite = kernels.top_logsumexp(logits, m)
    return Candidates(values, ids, norm) if bool(finite.all()) else None


def _compact(logits: torch.Tensor, cands: Candidates, windows: list[Sequence[int]],
             params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Rows short enough to penalize and rank like whole ones: (B, n) the raw scores of each row's candidates and of
    the window tokens they lack (padding: -inf), (B, n) their token ids, and each window in those positions."""
    ids = cands.ids.tolist()
    extra: list[list[int]] = []
    local_windows: list[list[int]] = []
    for row_ids, window, p in zip(ids, windows, params):
        more: list[int] = []
        if _penalized(p) and window:
            at = {t: i for i, t in enumerate(row_ids)}
            for t in window:
                if t not in at:
                    at[t] = len(row_ids) + len(more)
                    more.append(t)
            local_windows.append([at[t] for t in window])
        else:
            local_windows.append([])
        extra.append(more)
    width = max(map(len, extra))
    if not width:
        return cands.values.clone(), cands.ids, local_windows
    more_ids = torch.tensor([m + [0] * (width - len(m)) for m in extra], dtype=cands.ids.dtype)
    all_ids = torch.cat([cands.ids, more_ids], dim=1)  # (B, n)
    values = logits.gather(1, all_ids)
    for r, m in enumerate(extra):
        values[r, cands.ids.shape[1] + len(m):] = float("-inf")
    return values, all_ids, local_windows


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None], cands: Candidates | None = None,
) -> list[int]:
    """Pick the next token of every row of logits (B, V), each with its own settings, history and random stream.

    Order as in llama.cpp and transformers: repetition penalty (and OpenAI's frequency and presence penalties),
    temperature, top-k, top-p, min-p, then sample. The
    work over the whole vocabulary (penalty, temperature, top-k) runs once for the batch; a row's result does
    not depend on the other rows, so a sequence samples the same tokens batched or alone.
    Top-k runs first so that top-p sorts k candidates rather than the whole vocabulary. A temperature below
    GREEDY_BELOW samples greedily. A row whose scores are not finite numbers fails alone: RowsFailed carries the
    other rows' tokens (their constraints advanced), so a batch goes on without it. With `cands` (from `candidates`
    on the same logits) each row picks from its candidates: the same tokens, without a pass over whole rows.
    """
    windows = [penalty_window(h, p) for h, p in zip(histories, params)]
    token_of = None  # (B, n): the token id at each position of the rows worked on, where they are candidates only
    if cands is not None:
        logits, token_of, windows = _compact(logits, cands, windows, params)
    else:
        logits = logits.float()  # (B, V)
        if any(_penalized(p) or p.constraint is not None for p in params):
            logits = logits.clone()  # changed in place below (the caller's logits stay as they are)
    apply_repetition_penalty(logits, windows, [p.repetition_penalty for p in params])
    apply_additive_penalties(logits, windows, params)
    for r, p in enumerate(params):
        if p.constraint is not None:
            p.constraint.mask(logits[r])
    out: list[int] = [0] * len(params)
    failed: dict[int, str] = {}
    greedy = [r for r, p in enumerate(params) if p.temperature < GREEDY_BELOW]
    if greedy:
        best_values, best = torch.max(logits[greedy], dim=-1)
        for r, token, value in zip(greedy, best.tolist(), best_values):
            if _not_finite(value):  # NaN scores, or a constraint that allows no token (-inf everywhere)
                failed[r] = "the model's scores for this sequence are not finite numbers" if value.isnan() or value > 0 \
                    else "no token is allowed here (the constraint and the vocabulary have nothing in common)"
            out[r] = int(token) if token_of is None else int(token_of[r, token])
    by_k: dict[int, list[int]] = {}
    for r, p in enumerate(params):
        if p.temperature >= GREEDY_BELOW:
            by_k.setdefault(p.top_k, []).append(r)
    for k, rows in by_k.items():
        temps = torch.tensor([params[r].temperature for r in rows], dtype=logits.dtype)
        # top-k before temperature (same candidates, as T > 0 keeps the order): k values divided, not the vocabulary
        values, ids = top_candidates(logits if len(rows) == len(params) else logits[rows], k)  # (R, k), (R, k)
        if token_of is not None:
            ids = (token_of if len(rows) == len(params) else token_of[rows]).gather(1, ids)
        values = values / temps[:, None]
        for i, r in enumerate(rows):
            if _not_finite(values[i, 0]):  # the largest: +inf or NaN (topk puts NaN first) would poison the softmax
                failed[r] = "the scores for this sequence are not finite numbers after its sampling settings"
                continue
            candidates, probs = row_distribution(values[i], ids[i], params[r])
            out[r] = int(candidates[torch.multinomial(probs, 1, generator=generators[r])])
    for r, p in enumerate(params):
        if p.constraint is not None and r not in failed:
            p.constraint.advance(out[r])
    if failed:
        raise RowsFailed(failed, out)
    return out


def sample_next(
    logits: torch.Tensor, params: SamplingParams, history: Sequence[int], generator: torch.Generator | None
) -> int:
    """Pick the next token id from one row of logits (V,), given the token history for the penalty."""
    return sample_rows(logits[None], [params], [history], [generator])[0]
