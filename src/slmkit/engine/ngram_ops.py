"""Pure math of a smoothed n-gram model over a tokenizer's ids, counted from fractional observations (`slmkit
ngram`: a whitebox student read off a teacher's next-token distributions, or the classic model of a text).

An observation is an n-gram that occurred with probability p: 1 for a token read from text, the teacher's
probability for a token it would write next. Following Zhang and Chiang (2014, "Kneser-Ney smoothing on expected
counts"), every n-gram type keeps its expected count E[c] and the distribution of its count c over 0..4 and 5+
(the observations independent events); modified Kneser-Ney's three discounts then apply to expectations:
    a(u w)   = max(E[c(uw)] - D1 P(c=1) - D2 P(c=2) - D3 P(c>=3), 0) / E[c(u .)]
    gamma(u) = 1 - sum_w a(u w)
    p(w | u) = a(u w) + gamma(u) p(w | u')          (u' drops u's first token; the unigram level backs off to 1/V)
The highest order counts the observations; each lower order counts, for every type, the distinct left contexts it
was seen after (continuation counts: a type of the order above present with probability 1 - P(c=0)).

The same model in backoff form (NgramModel, what ARPA files hold and what the engine scores with): every explicit
n-gram's full probability and every context's backoff weight, p(w | u) = p*(u w) if u w is explicit, else
bo(u) p(w | u'). Keys pack an n-gram's ids into one int64, `bits` per token, first token highest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

KEY_BITS = 62  # an n-gram's packed ids fit an int64
LOG10 = math.log(10.0)


def bits_for(vocab: int) -> int:
    return max(1, int(vocab - 1).bit_length())


def max_order(vocab: int) -> int:
    return KEY_BITS // bits_for(vocab)


def encode(cols: np.ndarray, bits: int) -> np.ndarray:
    """Keys of n-grams given as rows of ids (n, k) -> (n,)."""
    cols = np.asarray(cols, dtype=np.int64)
    key = np.zeros(cols.shape[0], dtype=np.int64)
    for j in range(cols.shape[1]):
        key = (key << bits) | cols[:, j]
    return key


def decode(keys: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Ids (n, k) of keys of order k."""
    mask = (1 << bits) - 1
    return np.stack([(keys >> (bits * (k - 1 - j))) & mask for j in range(k)], axis=1)


def _lookup(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found (n,), index (n,)) of keys in a sorted table (index clipped where not found)."""
    if len(table) == 0:
        return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=np.int64)
    idx = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return table[idx] == keys, idx


# ---------------------------------------------------------------- counting

@dataclass
class Counts:
    """The n-gram types of one order: keys (n,) sorted, expected counts (n,), P(count = 0..4, 5+) (n, 6)."""

    keys: np.ndarray
    expected: np.ndarray
    dist: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """P(count >= 1): how likely the type occurred at all."""
        return 1.0 - self.dist[:, 0]


def count_stats(keys: np.ndarray, p: np.ndarray) -> Counts:
    """Group observations (key, probability in (0, 1]) by type: the expected count and the count's distribution,
    exactly (a dynamic programme over each type's observations, all types stepped together)."""
    keys = np.asarray(keys, dtype=np.int64)
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    order = np.argsort(keys, kind="stable")
    keys, p = keys[order], p[order]
    uniq, start, size = np.unique(keys, return_index=True, return_counts=True)
    if len(uniq) == 0:
        return Counts(uniq, np.zeros(0), np.zeros((0, 6)))
    expected = np.add.reduceat(p, start)
    by_size = np.argsort(-size, kind="stable")  # the types with most observations first: step j updates a prefix
    starts, sizes = start[by_size], size[by_size]
    q = np.zeros((len(uniq), 6))
    q[:, 0] = 1.0
    for j in range(int(sizes[0])):
        n = int(np.searchsorted(-sizes, -j, side="left"))  # types with more than j observations
        pj = p[starts[:n] + j][:, None]
        qa = q[:n]
        new = qa * (1.0 - pj)
        new[:, 1:] += qa[:, :-1] * pj
        new[:, 5] += qa[:, 5] * pj[:, 0]  # 5+ stays 5+
        q[:n] = new
    dist = np.empty_like(q)
    dist[by_size] = q
    return Counts(uniq, expected, dist)


def continuation(counts: Counts, k: int, bits: int) -> Counts:
    """Counts of order k-1 from those of order k: each type's suffix, present with the type's probability."""
    return count_stats(counts.keys & ((1 << (bits * (k - 1))) - 1), counts.present)


def all_orders(top: Counts, order: int, bits: int) -> list[Counts]:
    """Counts of orders 1..order (index 0 is unigrams) from the highest order's."""
    out = [top]
    for k in range(order, 1, -1):
        out.append(continuation(out[-1], k, bits))
    return out[::-1]


def closed_discounts(c: Counts) -> tuple[float, float, float]:
    """Chen and Goodman's modified Kneser-Ney discounts from the expected counts-of-counts n1..n4."""
    n1, n2, n3, n4 = (float(c.dist[:, i].sum()) for i in range(1, 5))
    if min(n1, n2, n3, n4) <= 1e-9:
        return 0.5, 1.0, 1.5
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return tuple(float(np.clip(x, 0.05, i + 1)) for i, x in enumerate(d))  # type: ignore[return-value]


# ---------------------------------------------------------------- interpolated estimate

@dataclass
class Level:
    """One order of the interpolated model: explicit n-grams (keys sorted) with their discounted share a, and
    contexts (keys sorted) with their interpolation weight gamma."""

    keys: np.ndarray
    a: np.ndarray
    ctx: np.ndarray
    gamma: np.ndarray


def estimate_level(c: Counts, k: int, bits: int, discounts: Sequence[float], keep: np.ndarray | None = None) -> Level:
    """Order k of the interpolated model; with `keep` (a mask over the types), the others are dropped and their mass
    goes to the context's gamma (prune_masks; the unigram level is never pruned)."""
    d1, d2, d3 = discounts
    disc = np.maximum(c.expected - d1 * c.dist[:, 1] - d2 * c.dist[:, 2] - d3 * c.dist[:, 3:].sum(1), 0.0)
    ctx_of = c.keys >> bits if k > 1 else np.zeros(len(c.keys), dtype=np.int64)
    ctx, inverse = np.unique(ctx_of, return_inverse=True)
    total = np.bincount(inverse, weights=c.expected, minlength=len(ctx))
    a = disc / np.maximum(total[inverse], 1e-300)
    keep = np.ones(len(a), dtype=bool) if k == 1 or keep is None else keep
    kept_share = np.bincount(inverse[keep], weights=a[keep], minlength=len(ctx))
    live = np.bincount(inverse[keep], minlength=len(ctx)) > 0
    return Level(c.keys[keep], a[keep], ctx[live], np.clip(1.0 - kept_share[live], 0.0, 1.0))


def interp_logprob(levels: list[Level], vocab: int, bits: int, hist: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Natural-log p(w | hist) under the interpolated model; hist (n, order-1) ids, -1 where the text had none."""
    w = np.asarray(w, dtype=np.int64)
    hist = np.asarray(hist, dtype=np.int64).reshape(len(w), -1)
    uni = levels[0]
    a1 = np.zeros(vocab)
    a1[uni.keys] = uni.a
    g0 = float(uni.gamma[0]) if len(uni.gamma) else 1.0
    p = a1[w] + g0 / vocab
    for k in range(2, len(levels) + 1):
        ctx = hist[:, hist.shape[1] - (k - 1):]
        valid = (ctx >= 0).all(1)
        ckey = encode(np.where(ctx >= 0, ctx, 0), bits)
        found, idx = _lookup(levels[k - 1].keys, (ckey << bits) | w)
        cfound, cidx = _lookup(levels[k - 1].ctx, ckey)
        a = np.where(found, levels[k - 1].a[idx] if len(levels[k - 1].a) else 0.0, 0.0)
        g = np.where(cfound, levels[k - 1].gamma[cidx] if len(levels[k - 1].gamma) else 1.0, 1.0)
        p = np.where(valid, a + g * p, p)
    return np.log(np.maximum(p, 1e-300))


def prune_masks(counts: list[Counts], vocab: int, max_entries: int | None) -> list[np.ndarray | None]:
    """Which types of each order a model of about max_entries n-grams keeps: all unigrams, and above them the types
    with the largest expected counts, whatever their order (None: keep all)."""
    if not max_entries:
        return [None] * len(counts)
    expected = np.concatenate([c.expected for c in counts[1:]]) if len(counts) > 1 else np.zeros(0)
    kept = np.zeros(len(expected), dtype=bool)
    kept[np.argsort(-expected, kind="stable")[:max(0, max_entries - vocab)]] = True
    out: list[np.ndarray | None] = [None]
    for c in counts[1:]:
        out.append(kept[:len(c.keys)])
        kept = kept[len(c.keys):]
    return out


def fit_discounts(counts: list[Counts], vocab: int, bits: int, hist: np.ndarray, w: np.ndarray, *,
                  steps: int = 10, keep: Sequence[np.ndarray | None] | None = None,
                  advance: Callable[[int], None] = lambda n: None) -> list[tuple[float, float, float]]:
    """Each order's discounts: Chen and Goodman's closed form scaled by the factor (0.2 to 1.8) that gives held-out
    text (hist, w) the highest likelihood, found by golden-section search order by order, lowest first."""
    base = [closed_discounts(c) for c in counts]
    scales = [1.0] * len(counts)
    keep = list(keep) if keep is not None else [None] * len(counts)
    levels = [estimate_level(c, k + 1, bits, base[k], keep[k]) for k, c in enumerate(counts)]

    def loss(k: int, s: float) -> float:
        trial = levels.copy()
        trial[k] = estimate_level(counts[k], k + 1, bits, [min(x * s, i + 1) for i, x in enumerate(base[k])], keep[k])
        return -float(interp_logprob(trial, vocab, bits, hist, w).mean())

    ratio = (math.sqrt(5) - 1) / 2
    for k in range(len(counts)):
        lo, hi = 0.2, 1.8
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        f1, f2 = loss(k, x1), loss(k, x2)
        for _ in range(steps):
            if f1 <= f2:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - ratio * (hi - lo)
                f1 = loss(k, x1)
            else:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + ratio * (hi - lo)
                f2 = loss(k, x2)
        scales[k] = x1 if f1 <= f2 else x2
        levels[k] = estimate_level(counts[k], k + 1, bits, [min(x * scales[k], i + 1) for i, x in enumerate(base[k])], keep[k])
        advance(1)
    return [tuple(min(x * s, i + 1) for i, x in enumerate(b)) for b, s in zip(base, scales)]  # type: ignore[misc]


# ---------------------------------------------------------------- backoff form (ARPA)

@dataclass
class NgramModel:
    """Backoff form: per order k (index k-1) the explicit n-grams' keys (sorted), natural-log probabilities and
    natural-log backoff weights as contexts (0 where none). The unigram level lists every id in order."""

    vocab: int
    keys: list[np.ndarray]
    logp: list[np.ndarray]
    logbo: list[np.ndarray]

    @property
    def order(self) -> int:
        return len(self.keys)

    @property
    def bits(self) -> int:
        return bits_for(self.vocab)

    @property
    def entries(self) -> int:
        return sum(len(k) for k in self.keys)


def backoff_form(levels: list[Level], vocab: int) -> NgramModel:
    """The interpolated model written as explicit probabilities and backoff weights (exactly the same
    distribution): every n-gram of a level and every context of the level above is explicit."""
    bits, order = bits_for(vocab), len(levels)
    keys, logp, logbo = [], [], []
    for k in range(1, order + 1):
        if k == 1:
            kk = np.arange(vocab, dtype=np.int64)
        else:
            kk = np.union1d(levels[k - 1].keys, levels[k].ctx if k < order else np.zeros(0, dtype=np.int64))
        ids = decode(kk, k, bits)
        hist = np.full((len(kk), order - 1), -1, dtype=np.int64)
        if k > 1:
            hist[:, order - k:] = ids[:, :-1]
        keys.append(kk)
        logp.append(interp_logprob(levels[:k], vocab, bits, hist[:, order - k:] if k > 1 else hist[:, :0], ids[:, -1]))
        bo = np.zeros(len(kk))
        if k < order:
            found, idx = _lookup(levels[k].ctx, kk)
            bo[found] = np.log(np.maximum(levels[k].gamma[idx[found]], 1e-300))
        logbo.append(bo)
    return NgramModel(vocab, keys, logp, logbo)


def logprob(model: NgramModel, hist: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Natural-log p(w | hist) in backoff form; hist (n, order-1), -1 where the text had none."""
    w = np.asarray(w, dtype=np.int64)
    hist = np.asarray(hist, dtype=np.int64).reshape(len(w), -1)
    bits = model.bits
    lp = model.logp[0][w]
    for k in range(2, model.order + 1):
        ctx = hist[:, hist.shape[1] - (k - 1):]
        valid = (ctx >= 0).all(1)
        ckey = encode(np.where(ctx >= 0, ctx, 0), bits)
        found, idx = _lookup(model.keys[k - 1], (ckey << bits) | w)
        cfound, cidx = _lookup(model.keys[k - 2], ckey)
        bo = np.where(cfound, model.logbo[k - 2][cidx], 0.0)
        lp = np.where(valid, np.where(found, model.logp[k - 1][idx], lp + bo), lp)
    return lp


def dense_row(model: NgramModel, hist: Sequence[int], dtype: type = np.float64) -> np.ndarray:
    """log p(. | hist) over the whole vocabulary (V,), from the last order-1 ids of hist."""
    bits, mask = model.bits, (1 << model.bits) - 1
    row = model.logp[0].astype(dtype)  # a copy
    hist = list(hist)[-(model.order - 1):] if model.order > 1 else []
    for k in range(2, min(model.order, len(hist) + 1) + 1):
        ckey = 0
        for t in hist[len(hist) - (k - 1):]:
            ckey = (ckey << bits) | int(t)
        table = model.keys[k - 2]
        i = int(np.searchsorted(table, ckey))
        if i == len(table) or table[i] != ckey:  # an unseen context: the order below as it is
            continue
        row += model.logbo[k - 2][i]
        lo, hi = np.searchsorted(model.keys[k - 1], [ckey << bits, (ckey + 1) << bits])
        row[model.keys[k - 1][lo:hi] & mask] = model.logp[k - 1][lo:hi]
    return row


def top_branches(model: NgramModel, counts_ctx: np.ndarray, contexts: int, branches: int) -> list[tuple[list[int], list[tuple[int, float]]]]:
    """The `contexts` given context keys' (of order-1 ids) likeliest `branches` next ids with probabilities."""
    out = []
    for ckey in counts_ctx[:contexts]:
        hist = decode(np.array([ckey]), model.order - 1, model.bits)[0].tolist()
        row = dense_row(model, hist)
        best = np.argsort(-row)[:branches]
        out.append((hist, [(int(t), float(math.exp(row[t]))) for t in best]))
    return out


def write_arpa(model: NgramModel, path: Path, word: Callable[[int], str]) -> None:
    """The model as an ARPA file (log10 probabilities and backoff weights; every tool that reads n-gram models
    reads it)."""
    bits = model.bits
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\\data\\\n" + "".join(f"ngram {k + 1}={len(keys)}\n" for k, keys in enumerate(model.keys)) + "\n")
        for k in range(model.order):
            fh.write(f"\\{k + 1}-grams:\n")
            ids = decode(model.keys[k], k + 1, bits)
            lp10, bo10 = model.logp[k] / LOG10, model.logbo[k] / LOG10
            for row, p, bo in zip(ids.tolist(), lp10.tolist(), bo10.tolist()):
                words = " ".join(word(t) for t in row)
                fh.write(f"{p:.6f}\t{words}\t{bo:.6f}\n" if bo != 0.0 else f"{p:.6f}\t{words}\n")
            fh.write("\n")
        fh.write("\\end\\\n")


def read_arpa(path: Path, vocab: int, word_id: Callable[[str], int]) -> NgramModel:
    """An ARPA file written by write_arpa (or any with the same words) back into backoff form; a word the tokenizer
    lacks is refused by word_id."""
    bits = bits_for(vocab)
    keys: list[list[int]] = []
    logp: list[list[float]] = []
    logbo: list[list[float]] = []
    k = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line or line.startswith("ngram ") or line == "\\data\\":
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                k = int(line[1:line.index("-")])
                keys.append([]), logp.append([]), logbo.append([])
                continue
            if line == "\\end\\":
                break
            parts = line.split("\t")
            if len(parts) < 2 or k == 0:
                raise ValueError(f"{path}: not an ARPA line: {line[:80]!r}")
            key = 0
            for w in parts[1].split(" "):
                key = (key << bits) | word_id(w)
            keys[-1].append(key)
            logp[-1].append(float(parts[0]) * LOG10)
            logbo[-1].append(float(parts[2]) * LOG10 if len(parts) > 2 else 0.0)
    out_keys, out_p, out_bo = [], [], []
    for kk, pp, bb in zip(keys, logp, logbo):
        kk_a = np.array(kk, dtype=np.int64)
        order = np.argsort(kk_a, kind="stable")
        out_keys.append(kk_a[order]), out_p.append(np.array(pp)[order]), out_bo.append(np.array(bb)[order])
    if not out_keys or len(out_keys[0]) != vocab:
        raise ValueError(f"{path}: its unigrams do not list the {vocab} ids of the tokenizer")
    full = np.full(vocab, -np.inf)
    full[out_keys[0]] = out_p[0]
    bo1 = np.zeros(vocab)
    bo1[out_keys[0]] = out_bo[0]
    out_keys[0], out_p[0], out_bo[0] = np.arange(vocab, dtype=np.int64), full, bo1
    return NgramModel(vocab, out_keys, out_p, out_bo)

