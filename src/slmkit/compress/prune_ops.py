"""Pruning math, pure tensor functions (no models, no I/O).

Unstructured and N:M sparsity (weights zeroed inside dense matrices):
- magnitude: score |W|;
- Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, the weight times the norm of its input channel over the
  calibration tokens, compared within each output row;
- SparseGPT (Frantar & Alistarh 2023): an Optimal Brain Surgeon sweep that chooses the mask block by block by
  w^2 / [H^-1]_jj^2 and updates the remaining weights to make up for each pruned one.
Structured importance (what to remove whole):
- block influence (ShortGPT, Men et al. 2024): 1 - cos(block input, block output), averaged over tokens;
- channel and head scores (as Minitron ranks width by activations): the L2 norm of a channel's activation over
  the calibration tokens times the norm of the weights that read it.
Shapes: W is (N out, K in); X statistics are per input channel (K,).
"""

from __future__ import annotations

import torch

from slmkit.compress.quant_ops import obs_sweep


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): at most N nonzero weights in every M consecutive weights of a row (N < M)."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not N:M (for example 2:4)") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.abs()  # (N, K)


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2: x_norm (K,) is each input channel's L2 norm over the calibration tokens."""
    return w.abs() * x_norm[None, :]  # (N, K)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is kept: in every row, the lowest-scoring `sparsity` share of weights is pruned."""
    n_prune = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        idx = torch.topk(scores, n_prune, dim=1, largest=False).indices  # (N, n_prune)
        keep.scatter_(1, idx, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: in every group of m consecutive weights of a row, the n highest scores."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"an N:M pattern with M={m} needs input widths divisible by {m}; this layer has {k}")
    groups = scores.reshape(rows, k // m, m)  # (N, K/m, m)
    idx = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, k)


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
              block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT: prune `sparsity` of each row (or to N:M), choosing the mask per block of columns by
    w^2 / [H^-1]_jj^2 on the error-updated weights, and compensating in the columns not yet pruned. Returns the
    pruned weight (N, K), zeros where pruned."""
    state: dict[str, torch.Tensor] = {}

    def update(w1: torch.Tensor, _rest: torch.Tensor, hinv1: torch.Tensor, i: int, _col: int) -> torch.Tensor:
        d = torch.diag(hinv1)  # (b,)
        if nm is None and i == 0:  # adaptive mask for the whole block, chosen on its updated weights
            score = w1.square() / d[None, :].square()  # (N, b)
            state["keep"] = row_mask(score, sparsity)
        elif nm is not None and i % nm[1] == 0:
            if i == 0:
                state["keep"] = torch.ones_like(w1, dtype=torch.bool)
            span = slice(i, i + nm[1])
            score = w1[:, span].square() / d[span][None, :].square()  # (N, m)
            state["keep"][:, span] = nm_mask(score, *nm)
        return w1[:, i] * state["keep"][:, i]

    if nm is not None and block % nm[1]:
        block -= block % nm[1]
    return obs_sweep(w, hessian, update, block=block, damp=damp)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of a block's input and output hidden states, per token: (T, H), (T, H) -> (T,).
    A block that barely changes its input (high similarity) matters little."""
    return 1 - torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)


def channel_scores(x_sq_mean: torch.Tensor, w_in_cols: torch.Tensor) -> torch.Tensor:
    """Importance of each input channel of a layer that reads it: ||X_j||_2 * ||W_:,j||_2, with x_sq_mean (K,) the
    channel's mean squared activation and w_in_cols (N, K) the weight reading it. -> (K,)"""
    return x_sq_mean.clamp(min=0).sqrt() * w_in_cols.norm(dim=0)


def group_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Sum channel scores over consecutive groups (a head's channels, or a KV group's query heads): (K,) -> (K/group,)."""
    return scores.reshape(-1, group).sum(-1)


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in their original order (so a pruned layer keeps its layout)."""
    return torch.sort(torch.topk(scores, count).indices).values


def wanda_loss_share(w: torch.Tensor, x_norm: torch.Tensor, sparsity: float = 0.5) -> float:
    """How much of a layer's Wanda score mass (|W| * ||X||) pruning `sparsity` of each row removes: a layer's
    sensitivity to pruning, comparable across layers (0: nothing of weight lost, 1: everything)."""
    score = wanda_scores(w, x_norm)
    return float((score * ~row_mask(score, sparsity)).sum() / score.sum().clamp(min=1e-12))


def sparsity_of(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()
