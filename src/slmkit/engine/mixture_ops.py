"""A mixture of specialists by total probability (pure math, no model): the next-token distribution is
sum_d p(d | context) p(x | context, d), the domain weights p(d | context) updated after every token by Bayes from
each specialist's likelihood of it, with a fixed share of the weight returned to the prior (Herbster and Warmuth's
fixed share: a conversation can change domain; share 0 is exact Bayes). No router is trained: the weights are what
the specialists' own predictions of the text so far say.

Shapes: D specialists, V vocabulary, B rows, T positions; everything in log space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def log_prior(prior: Sequence[float] | None, d: int) -> torch.Tensor:
    """The log of the prior weights (D,), normalised; uniform when None."""
    p = torch.full((d,), 1.0 / d, dtype=torch.float64) if prior is None else torch.tensor(list(prior), dtype=torch.float64)
    if p.shape != (d,) or bool((p <= 0).any()):
        raise ValueError(f"the prior needs {d} positive weights, got {list(prior or [])}")
    return (p / p.sum()).log()


def update(log_w: torch.Tensor, token_ll: torch.Tensor, prior: torch.Tensor, share: float) -> torch.Tensor:
    """The weights after one token: Bayes (log_w + token_ll, normalised), then `share` of the weight back to the
    prior (share 1: always the prior, a fixed mixture). log_w, token_ll: (..., D) (token_ll: each specialist's log-probability of the token it saw); prior: (D,)."""
    post = log_w + token_ll
    post = post - torch.logsumexp(post, dim=-1, keepdim=True)  # (..., D)
    if share <= 0:
        return post
    if share >= 1:  # all of it: the weights never move from the prior (a fixed mixture)
        return prior.expand_as(post).clone()
    return torch.logaddexp(post + math.log1p(-share), prior + math.log(share))


def mixed(log_w: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """The mixture's log-probabilities: log sum_d w_d p_d(x). log_w: (..., D); logprobs: (..., D, V) -> (..., V)."""
    return torch.logsumexp(log_w.to(logprobs.dtype).unsqueeze(-1) + logprobs, dim=-2)


def weights_along(token_ll: torch.Tensor, prior: torch.Tensor, share: float) -> torch.Tensor:
    """The weights before each of T predicted tokens, given each specialist's log-probability of each (T, D):
    row t is p(d | the text before token t) -> (T, D); row 0 is the prior."""
    out = torch.empty(token_ll.shape, dtype=torch.float64)
    w = prior
    for t in range(token_ll.shape[0]):
        out[t] = w
        w = update(w, token_ll[t].double(), prior, share)
    return out
