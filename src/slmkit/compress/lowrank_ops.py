"""Low-rank factorization math, pure tensor functions.

Activation-aware truncated SVD (SVD-LLM, Wang et al. 2024; ASVD is the diagonal form of the same idea): the error
that matters is in the layer's output on real inputs, ||X (W - W')^T||, not in the weights. With the inputs'
second moment H = X^T X / n = S S^T (Cholesky), that error is ||(W - W') S||_F, so the best rank-r W' comes from
the SVD of W S: W S = U diag(s) V^T, W' = U_r diag(s_r) V_r^T S^-1. The squared singular values of W S are the
output energy each rank carries, which is what ranks are chosen by.
Shapes: W (N out, K in), H (K, K).
"""

from __future__ import annotations

import torch


def whitening(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """S (K, K) lower-triangular with S S^T = H + damp * mean(diag H) * I (damped so it is positive definite)."""
    h = h.double()
    k = h.shape[0]
    reg = damp * torch.mean(torch.diag(h)).clamp(min=1e-8)
    return torch.linalg.cholesky(h + reg * torch.eye(k, dtype=h.dtype))


def whitened_svd(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (N, m), singular values (m,), V^T S^-1 (m, K)) of W S, in float64."""
    u, sv, vt = torch.linalg.svd(w.double() @ s, full_matrices=False)
    vt_sinv = torch.linalg.solve_triangular(s, vt, upper=False, left=False)  # vt @ S^-1
    return u, sv, vt_sinv


def factors(u: torch.Tensor, sv: torch.Tensor, vt_sinv: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (N, r), down (r, K)) with up @ down the rank-r approximation; sqrt(s) goes to each side."""
    root = sv[:rank].sqrt()
    return (u[:, :rank] * root[None, :]).float(), (root[:, None] * vt_sinv[:rank]).float()


def energy_rank(sv: torch.Tensor, energy: float) -> int:
    """The smallest rank whose squared singular values hold `energy` of the total."""
    share = torch.cumsum(sv.double().square(), 0) / sv.double().square().sum()
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int, int]], budget: int) -> dict[str, int]:
    """Ranks per layer within `budget` weights in total: greedily keep the singular directions that carry the most
    of their layer's output energy per weight they cost (N + K each). spectra: name -> (singular values, N, K).
    A layer whose rank would cost as much as its dense matrix keeps full rank (it stays dense)."""
    items = []
    for name, (sv, n, k) in spectra.items():
        share = sv.double().square() / sv.double().square().sum()
        items += [(float(e) / (n + k), name, i) for i, e in enumerate(share)]
    items.sort(reverse=True)
    ranks = {name: 0 for name in spectra}
    used = 0
    for _, name, _i in items:  # directions of one layer come in order of their singular values
        sv, n, k = spectra[name]
        if used + n + k > budget:
            continue
        ranks[name] += 1
        used += n + k
    return {name: max(r, 1) for name, r in ranks.items()}


def lowrank_params(n: int, k: int, rank: int) -> int:
    return rank * (n + k)
