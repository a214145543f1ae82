"""Vocabulary trimming as pure functions on a `tokenizers` tokenizer.json (a dict): which token ids a corpus needs,
closed under the BPE merges that build them, and the tokenizer.json of just those tokens with ids renumbered.

Why the closure keeps encoding exact: BPE applies, at every step, the lowest-ranked merge whose two parts stand next to
each other. Keeping every token a kept token can be merged from (recursively, every derivation) keeps every merge the
original tokenization of the corpus applied, in the same order; the merges that are dropped were never the lowest
applicable there, so the kept ones are applied exactly as before and the corpus encodes to the same tokens (renumbered).
Text outside the kept set still encodes, into shorter pieces: down to the byte-fallback tokens <0xNN> (SentencePiece-
style BPE, Gemma's) or the 256-character byte alphabet (byte-level BPE, GPT-2's), which are always kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def check_trimmable(tj: dict[str, Any]) -> str | None:
    """Why this tokenizer cannot be trimmed here (None: it can)."""
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}; trimming handles BPE vocabularies (byte-level or with byte fallback)"
    if not model.get("byte_fallback") and not all(chr(c) in model["vocab"] for c in range(33, 127)):
        return "it has neither byte-fallback pieces nor a byte-level alphabet, so text outside the kept tokens could not encode"
    return None


def floor_ids(tj: dict[str, Any], named: Iterable[str]) -> set[int]:
    """Ids every trimmed vocabulary keeps: the byte-fallback pieces <0xNN> (or, for byte-level BPE, the one-character
    tokens of its byte alphabet), the unknown token, and the `named` tokens (special tokens the config or chat template
    names), wherever they are."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    if model.get("byte_fallback"):
        keep = {i for t, i in vocab.items() if BYTE_PIECE.fullmatch(t)}
    else:
        keep = {i for t, i in vocab.items() if len(t) == 1}
    for t in [model.get("unk_token"), *named]:
        if t is not None and (t in vocab or t in added):
            keep.add(vocab.get(t, added.get(t)))
    keep |= {t["id"] for t in tj.get("added_tokens", []) if not t.get("special")}  # user-defined tokens stay
    return keep


def closure(tj: dict[str, Any], ids: set[int]) -> set[int]:
    """`ids` plus, recursively, both parts of every merge that builds a kept token."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    inverse = {i: t for t, i in vocab.items()}
    parts: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(model):
        parts.setdefault(a + b, []).append((a, b))
    keep = set(ids)
    stack = [inverse[i] for i in keep if i in inverse]
    while stack:
        for pair in parts.get(stack.pop(), ()):
            for piece in pair:
                i = vocab.get(piece)
                if i is not None and i not in keep:
                    keep.add(i)
                    stack.append(piece)
    return keep


def trimmed(tj: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """tokenizer.json holding only the tokens `keep` (old ids, ascending; new id = position), the merges among them,
    the added tokens among them and the post-processor's special ids renumbered."""
    new_id = {old: new for new, old in enumerate(keep)}
    out = dict(tj)
    model = dict(tj["model"])
    vocab = {t: new_id[i] for t, i in tj["model"]["vocab"].items() if i in new_id}
    model["vocab"] = vocab
    model["merges"] = [[a, b] for a, b in _merges(tj["model"]) if a in vocab and b in vocab and a + b in vocab]
    out["model"] = model
    out["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in tj.get("added_tokens", []) if t["id"] in new_id]
    post = tj.get("post_processor")
    if post is not None:
        out["post_processor"] = _renumber(post, new_id)
    return out


def _renumber(node: Any, new_id: dict[int, int]) -> Any:
    """A post-processor with every `ids` list of its special tokens mapped to the new ids."""
    if isinstance(node, dict):
        return {k: ([new_id[i] for i in v] if k == "ids" and isinstance(v, list) else _renumber(v, new_id)) for k, v in node.items()}
    if isinstance(node, list):
        return [_renumber(v, new_id) for v in node]
    return node
