"""Distillation losses, pure tensor functions. The teacher is given as its top-k log-probabilities per position
(what the cache keeps): values (B, T, k) and token ids (B, T, k); the student as full logits (B, T, V).

Both distributions are compared on the teacher's top-k support, each renormalized there (at temperature tau the
teacher's k log-probabilities are divided by tau before renormalizing, which is exact for the shape of the top-k
part). `mask` (B, T) selects the positions that count. Every loss is a mean over those positions, scaled by tau^2
(Hinton et al. 2015) so gradients keep their size across temperatures.
- forward KL(p_t || p_s): mass-covering, the classic KD loss;
- reverse KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al. 2023);
- generalized JSD with weight beta (GKD, Agarwal et al. 2024): beta KL(p_t || m) + (1 - beta) KL(p_s || m),
  m = beta p_t + (1 - beta) p_s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd")


def _on_support(student_logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher log p, student log q) over the teacher's top-k, both renormalized there: (B, T, k) each."""
    t = torch.log_softmax(t_logp.float() / tau, dim=-1)
    s = torch.log_softmax(student_logits.float().gather(-1, t_ids.long()) / tau, dim=-1)
    return t, s


def _masked_mean(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (per_pos * m).sum() / m.sum().clamp(min=1)


def kd_loss(kind: str, student_logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor, mask: torch.Tensor,
            *, tau: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    t, s = _on_support(student_logits, t_logp, t_ids, tau)
    if kind == "fkl":
        per = (t.exp() * (t - s)).sum(-1)
    elif kind == "rkl":
        per = (s.exp() * (s - t)).sum(-1)
    elif kind == "jsd":
        pt, ps = t.exp(), s.exp()
        m = (beta * pt + (1 - beta) * ps).clamp(min=1e-12).log()
        per = beta * (pt * (t - m)).sum(-1) + (1 - beta) * (ps * (s - m)).sum(-1)
    else:
        raise ValueError(f"unknown loss {kind!r}; losses: {', '.join(LOSSES)}")
    return _masked_mean(per, mask) * tau * tau


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next tokens at the masked positions: logits (B, T, V), targets (B, T)."""
    per = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return _masked_mean(per.reshape(targets.shape), mask)


CE_CHUNK = 512  # positions whose logits exist at once in chunked_next_token_loss


def chunked_next_token_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, mask: torch.Tensor,
                            chunk: int = CE_CHUNK) -> torch.Tensor:
    """next_token_loss(head(hidden), targets, mask) without ever holding the (B, T, V) logits: the output head and
    the cross-entropy run on `chunk` positions at a time, each piece recomputed in backward (activation
    checkpointing), so only one chunk's logits (chunk x V floats) exist at once, in forward and in backward. With a
    49k vocabulary at 4 x 256 positions that is 100 MB instead of ~1 GB (logits, their log-softmax and gradients).
    hidden (B, T, E), targets and mask (B, T)."""
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])  # (N, E)
    t, m = targets.reshape(-1), mask.reshape(-1).float()  # (N,)
    keep = m > 0  # positions that do not count need no logits at all
    h, t, m = h[keep], t[keep], m[keep]

    def piece(hh: torch.Tensor, tt: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(head(hh).float(), tt, reduction="none") * mm).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(piece, h[i:i + chunk], t[i:i + chunk], m[i:i + chunk], use_reentrant=False)
    return total / mask.float().sum().clamp(min=1)


def hidden_alignment(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Minitron's hidden-state loss: mean squared error between the student's and the teacher's final hidden
    states (B, T, H) at the learned positions, relative to the teacher's mean square (scale-free)."""
    m = mask.to(student.dtype).unsqueeze(-1)  # (B, T, 1)
    err = ((student.float() - teacher.float()) ** 2 * m).sum()
    scale = (teacher.float() ** 2 * m).sum().clamp(min=1e-12)
    return err / scale
