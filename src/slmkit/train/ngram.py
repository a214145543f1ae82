"""`slmkit ngram`: a whitebox student read off a teacher, or the classic n-gram model of a text, installed in the
store (an ARPA file over the teacher's tokenizer; engine/ngram_ops.py holds the math).

Reading the teacher: the domain text is cut into windows; the teacher reads each window once, and from every
position the walk branches into the teacher's likeliest next tokens, deeper while a branch's probability from where
it left the text stays above a threshold (and, given general text, while its tokens are likelier in the domain text
than in the general text). That is the tree a depth-first walk with those limits visits; it is expanded level by
level so that each level is one forward pass (tree attention: every node sees its own ancestors only, in one KV
cache). Every visited context adds the teacher's next-token distribution (its top tokens) as fractional counts;
Kneser-Ney on expected counts turns them into the model, its discounts fitted on held-out text."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slmkit import progress
from slmkit.card import ModelCard
from slmkit.compress.parents import float_parent
from slmkit.config import settings
from slmkit.engine import ngram_ops as ng
from slmkit.engine.ngram_backend import arpa_words
from slmkit.engine.torch_backend import cache_arg_of
from slmkit.errors import SlmkitError
from slmkit.sources.forms import NGRAM_CONFIG, NGRAM_FILE, NGRAM_KEY
from slmkit.sources.hf_dir import FALLBACK_CONTEXT, load_float, load_tokenizer, model_config
from slmkit.store import Store, validate_name
from slmkit.train import data as td


@dataclass(frozen=True)
class Walk:
    """How the teacher is read (defaults written once, here)."""

    window: int = 128  # tokens of domain text the teacher reads at once
    top: int = 16  # of the teacher's next tokens kept per visited context (as fractional counts)
    min_p: float = 0.002  # a next token less likely than this adds no count
    branch: int = 3  # children of a node: the teacher's likeliest next tokens
    depth: int = 2  # levels of branches below each position of the text
    threshold: float = 0.1  # a branch goes on while its probability from where it left the text stays above this
    budget: int = 200_000  # tokens the teacher reads (text and branches)
    per_level: int = 512  # most nodes of one level of one window (the likeliest kept)
    gate: float = 0.0  # with general text: a branch goes on while sum log(p_domain / p_general) of its tokens >= gate


ORDER = 3
TEACHER_WEIGHTS = (0.0, 0.1, 0.3, 1.0)  # tried on held-out text, times the teacher's fractional counts beside the text's own
UNFITTED_WEIGHT = 0.3  # where the text is too short to hold any out
TOP_CONTEXTS = 8  # shown by `slmkit models show`, with their likeliest branches
TOP_BRANCHES = 5


def _tree_mask(ancestors: list[np.ndarray], cached: int) -> torch.Tensor:
    """(1, 1, n, cached + n) True where node j (the j-th new token) may attend: its ancestors and itself."""
    n = len(ancestors)
    allow = torch.zeros(n, cached + n, dtype=torch.bool)
    for j, anc in enumerate(ancestors):
        allow[j, torch.from_numpy(anc)] = True
        allow[j, cached + j] = True
    return allow[None, None]


def _observe(tails: np.ndarray, logits: torch.Tensor, walk: Walk, bits: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Fractional observations of the nodes with full histories: keys and probabilities; and every node's top
    next tokens (ids, probabilities) for branching."""
    probs, ids = torch.softmax(logits.float(), -1).topk(walk.top, dim=-1)  # (n, top)
    full = (tails >= 0).all(1)
    p = probs[torch.from_numpy(full)].numpy().astype(np.float64)
    keys = (ng.encode(tails[full], bits)[:, None] << bits) | ids[torch.from_numpy(full)].numpy().astype(np.int64)
    keep = p >= walk.min_p
    return keys[keep], p[keep], ids, probs


def _teacher_walk(model: Any, windows: torch.Tensor, order: int, walk: Walk, bits: int, gate: np.ndarray | None,
                  advance: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Observations (keys of `order`-grams, probabilities) from the teacher over `windows` (N, W) and counts of
    what it read."""
    from transformers import DynamicCache

    keys, probs = [], []
    read = nodes = 0
    cache_arg = cache_arg_of(model)
    h = order - 1
    for x in windows:
        if read >= walk.budget:
            break
        before = read
        x = x.tolist()
        w = len(x)
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([x]), **{cache_arg: cache}, use_cache=True).logits[0]  # (W, V)
        # level 0: the text's own positions; a node is (ancestors (cache indices), position, history tail, path p, gate)
        tails = np.full((w, h), -1, dtype=np.int64)
        for i in range(w):
            tail = x[max(0, i - h + 1): i + 1]
            tails[i, h - len(tail):] = tail
        k, p, top_ids, top_p = _observe(tails, logits, walk, bits)
        keys.append(k), probs.append(p)
        read += w
        level = [(np.arange(i + 1), i, tails[i], 1.0, 0.0) for i in range(w)]
        cached = w
        for _ in range(walk.depth):
            children = []
            for j, (anc, pos, tail, path, g) in enumerate(level):
                for t, q in zip(top_ids[j, :walk.branch].tolist(), top_p[j, :walk.branch].tolist()):
                    if cached == w and pos + 1 < w and t == x[pos + 1]:
                        continue  # the text's own next token: already a position of level 0
                    score = g + (float(gate[t]) if gate is not None else 0.0)
                    if path * q >= walk.threshold and (gate is None or score >= walk.gate):
                        children.append((path * q, j, t, score))
            if not children or read >= walk.budget:
                break
            children.sort(key=lambda c: -c[0])
            children = children[:min(walk.per_level, walk.budget - read)]
            new_level, ancestors = [], []
            for n, (path, j, t, score) in enumerate(children):
                anc, pos, tail, _, _ = level[j]
                ancestors.append(anc)
                new_level.append((np.append(anc, cached + n), pos + 1, np.append(tail[1:], t) if h else tail, path, score))
            ids = torch.tensor([[c[2] for c in children]])
            positions = torch.tensor([[nd[1] for nd in new_level]])
            with torch.inference_mode():
                logits = model(input_ids=ids, position_ids=positions, attention_mask=_tree_mask(ancestors, cached),
                               **{cache_arg: cache}, use_cache=True).logits[0]
            tails = np.stack([nd[2] for nd in new_level]) if h else np.zeros((len(new_level), 0), dtype=np.int64)
            k, p, top_ids, top_p = _observe(tails, logits, walk, bits)
            keys.append(k), probs.append(p)
            cached += len(children)
            read += len(children)
            nodes += len(children)
            level = new_level
        advance(read - before)
    return np.concatenate(keys), np.concatenate(probs), {"teacher_tokens": read, "branch_nodes": nodes}


def _walked(store: Store, model: str, folder: Path, tokenizer: Any, windows: torch.Tensor, data_sha: str, order: int,
            walk: Walk, bits: int, vocab: int, general: Path | None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The teacher's observations over `windows`: read once per (teacher, data, walk, order, general text) and kept
    in SLMKIT_HOME/cache/ngram, so another size or weight of the same model does not read the teacher again."""
    general_sha = hashlib.sha256(Path(general).expanduser().read_bytes()).hexdigest() if general else None
    key = hashlib.sha256(json.dumps([store.card(model).files, data_sha, order, walk.__dict__, general_sha]).encode()).hexdigest()[:32]
    path = settings().home / "cache" / "ngram" / f"walk-{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            progress.note(f"the teacher's reading of this text: {path.name} (reused)")
            return f["keys"], f["p"], json.loads(str(f["read"]))
    teacher, _ = load_float(folder, dtype=torch.float32, what=f"Loading the teacher {model}")
    gate = _general_gate(tokenizer, general, windows, vocab) if general else None
    with progress.bar(f"Reading {model} (tree of its likeliest branches)", walk.budget) as advance:
        keys, p, read = _teacher_walk(teacher, windows, order, walk, bits, gate, advance)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.npz")
    np.savez(tmp, keys=keys, p=p, read=json.dumps(read))
    os.replace(tmp, path)  # whole or absent: two runs never see half a file
    return keys, p, read


def _grams(windows: torch.Tensor, order: int) -> np.ndarray:
    """Every `order`-gram inside the windows (N, W), as rows of ids (n, order)."""
    x = windows.numpy().astype(np.int64)
    return np.stack([x[:, i: x.shape[1] - order + 1 + i] for i in range(order)], axis=-1).reshape(-1, order)


def _general_gate(tokenizer: Any, general: Path, domain: torch.Tensor, vocab: int) -> np.ndarray:
    """log(p_domain(t) / p_general(t)) per id, add-one unigram estimates."""
    text = Path(general).expanduser().read_text(encoding="utf-8", errors="replace")
    gen = np.bincount(np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64), minlength=vocab)[:vocab] + 1.0
    dom = np.bincount(domain.reshape(-1).numpy().astype(np.int64), minlength=vocab)[:vocab] + 1.0
    return np.log(dom / dom.sum()) - np.log(gen / gen.sum())


def ngram_stage(model: str, data: list[Path], *, name: str, from_text: bool = False, teacher_only: bool = False,
                teacher_weight: float | None = None, order: int = ORDER, walk: Walk = Walk(), general: Path | None = None,
                max_entries: int | None = None, store: Store | None = None) -> ModelCard:
    """Install `name`: an `order`-gram model over `model`'s tokenizer from the domain text `data`: the text's own
    counts plus `teacher_weight` times the fractional counts read off `model` as a teacher (the weight fitted on
    held-out text when None); from_text counts the text alone (the classic model), teacher_only reads the teacher
    alone. Kneser-Ney on expected counts, discounts fitted on 5% of the text held out; pruned to about max_entries
    n-grams if given."""
    store = store or Store()
    name = validate_name(name)
    store.check_free(name)
    if not data:
        raise SlmkitError("no data given", "Give the domain text: slmkit ngram --data FILE (text, JSONL or CSV).")
    if from_text and teacher_only:
        raise SlmkitError("--from-text and --teacher-only exclude each other", "Give one: the text alone, or the teacher alone.")
    if max_entries is not None and max_entries <= 0:
        raise SlmkitError(f"--max-entries {max_entries}: give a positive number of n-grams", "Or leave it out to keep every n-gram.")
    if teacher_weight is not None and not 0 < teacher_weight <= 1:
        raise SlmkitError(f"--teacher-weight {teacher_weight}: give a weight in (0, 1]", "Or leave it out: it is fitted on held-out text.")
    folder = store.require(model) if from_text else float_parent(store, model)[0]
    tokenizer, config = load_tokenizer(folder), model_config(folder)
    vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
    if not 1 <= order <= ng.max_order(vocab):
        raise SlmkitError(f"--order {order}: a {vocab}-token vocabulary allows orders 1 to {ng.max_order(vocab)}", "Give --order 3 (the default) or 4.")
    if walk.depth < 0 or walk.branch < 0 or not 0 < walk.threshold <= 1 or walk.budget < walk.window or walk.top < 1:
        raise SlmkitError(f"walk settings out of range: {walk}", f"--threshold in (0, 1], --budget at least {walk.window} tokens, --top at least 1, depth and branches >= 0.")
    bits = ng.bits_for(vocab)
    train, valid, info = td.build(tokenizer, list(data), seq_len=walk.window - 1, valid_fraction=0.05)
    started = time.perf_counter()
    text = np.zeros(0, dtype=np.int64) if teacher_only else ng.encode(_grams(train.ids, order), bits)
    keys, observed, read = np.zeros(0, dtype=np.int64), np.zeros(0), {"text_tokens": int(train.ids.numel())}
    if not from_text:
        keys, observed, walked = _walked(store, model, folder, tokenizer, train.ids, info["sha256"], order, walk, bits, vocab, general)
        read |= walked
    grams = _grams(valid.ids, order) if len(valid) else None  # each held-out position with a full history
    weights = ((0.0,) if from_text else (1.0,) if teacher_only else (teacher_weight,) if teacher_weight
               else TEACHER_WEIGHTS if grams is not None else (UNFITTED_WEIGHT,))
    with progress.step("Counting (expected counts) and fitting the discounts on held-out text"):
        fits = {w: _fit(np.concatenate([text, keys]), np.concatenate([np.ones(len(text)), w * observed]), order, vocab, grams, max_entries)
                for w in weights}
    weight = min(fits, key=lambda w: fits[w]["held_out_perplexity"] or 0.0)
    fit = fits[weight]
    built, counts = fit.pop("model"), fit.pop("counts")
    if weight == 0.0 and not from_text:
        progress.warn("reading the teacher did not help on held-out text (weight 0 fitted best): the model is the text's own counts")
    words = arpa_words(tokenizer, vocab)
    config = {**NGRAM_CONFIG, NGRAM_KEY: {"order": order, "vocab_size": vocab, "words": "tokens" if words[0] != "<id:0>" else "ids",
                                          "context_length": int(getattr(config, "max_position_embeddings", 0) or FALLBACK_CONTEXT)}}

    def write(staging: Path) -> None:
        with progress.step(f"Writing {name} ({built.entries:,} n-grams, ARPA)"):
            ng.write_arpa(built, staging / NGRAM_FILE, words.__getitem__)
            tokenizer.save_pretrained(str(staging))
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    source = "text" if from_text else "teacher" if teacher_only else "text and teacher"
    settings = {"source": source, "order": order, "data": info,
                **({} if from_text else {"walk": walk.__dict__, "general_text": str(general) if general else None,
                                         "teacher_weight": weight, "held_out_by_weight": {str(w): f["held_out_perplexity"] for w, f in fits.items()}}),
                **read, "observations": int(len(text) + len(keys)), "seconds": round(time.perf_counter() - started, 1),
                "max_entries": max_entries, **fit, "top_contexts": _top_contexts(built, counts[-1], tokenizer)}
    return store.derive(name, write, stage="ngram", parent=model, parameters=built.entries, settings=settings)


def _fit(keys: np.ndarray, observed: np.ndarray, order: int, vocab: int, grams: np.ndarray | None,
         max_entries: int | None) -> dict[str, Any]:
    """The model of some observations: counts of every order, pruning threshold, discounts fitted on the held-out
    grams (closed form without them), the backoff form and its held-out perplexity."""
    bits = ng.bits_for(vocab)
    counts = ng.all_orders(ng.count_stats(keys, observed), order, bits)
    keep = ng.prune_masks(counts, vocab, max_entries)
    if grams is not None:
        discounts = ng.fit_discounts(counts, vocab, bits, grams[:, :-1], grams[:, -1], keep=keep)
    else:
        discounts = [ng.closed_discounts(c) for c in counts]
    built = ng.backoff_form([ng.estimate_level(c, k + 1, bits, discounts[k], keep[k]) for k, c in enumerate(counts)], vocab)
    ppl = math.exp(-float(ng.logprob(built, grams[:, :-1], grams[:, -1]).mean())) if grams is not None else None
    return {"model": built, "counts": counts, "entries": [len(k) for k in built.keys],
            "discounts": [[round(d, 4) for d in ds] for ds in discounts], "held_out_perplexity": ppl}


def _top_contexts(model: ng.NgramModel, top: ng.Counts, tokenizer: Any) -> list[dict[str, Any]]:
    """The contexts counted most at the highest order, each with its likeliest branches (text), for `models show`."""
    if model.order < 2:
        return []
    contexts, inverse = np.unique(top.keys >> model.bits, return_inverse=True)
    weight = np.bincount(inverse, weights=top.expected)
    out = []
    for hist, branches in ng.top_branches(model, contexts[np.argsort(-weight)], TOP_CONTEXTS, TOP_BRANCHES):
        out.append({"context": tokenizer.decode(hist), "branches": [[tokenizer.decode([t]), round(p, 4)] for t, p in branches]})
    return out
