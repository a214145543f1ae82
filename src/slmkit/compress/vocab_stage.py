"""`slmkit prune --vocab CORPUS`: keep the tokens a corpus uses (compress/vocab_ops.py), slice the embedding and the
output head to them, and install the child with its lineage. Checked before installing: the corpus encodes to the same
tokens, renumbered (without --keep), and every text decodes back to itself."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.card import ModelCard, sha256_file
from slmkit.compress import vocab_ops
from slmkit.compress.parents import float_parent
from slmkit.data.jsonl import json_objects
from slmkit.errors import SlmkitError
from slmkit.layers.walk import count_params
from slmkit.sources.forms import VOCAB_MAP
from slmkit.sources.hf_dir import load_float
from slmkit.store import Store, validate_name

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")  # tokenizer_config.json names
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")  # config / generation_config fields


def _corpus(paths: list[Path]) -> list[str]:
    """Texts of the corpus files: lines of a .jsonl (its text/content fields), paragraphs of anything else."""
    texts: list[str] = []
    for path in paths:
        if not path.is_file():
            raise SlmkitError(f"corpus file {path} not found", "Pass --vocab with text (or .jsonl) files in your domain.")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for _, row in json_objects(raw.splitlines(), path):
                texts += [m["content"] for m in row.get("messages", []) if isinstance(m, dict) and isinstance(m.get("content"), str)]
                texts += [str(row[k]) for k in ("text", "prompt", "completion", "response") if k in row]
        else:
            texts += [p for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise SlmkitError("the corpus holds no text", "Pass --vocab with non-empty text files in your domain.")
    return texts


def _named_specials(tj: dict[str, Any], tokenizer: Any) -> list[str]:
    """Special tokens the model's config or chat template names (what chat and generation need)."""
    names = [getattr(tokenizer, key, None) for key in SPECIAL_KEYS]
    template = getattr(tokenizer, "chat_template", None) or ""
    names += [t for t in tokenizer.all_special_tokens if t in template]
    names += [t["content"] for t in tj.get("added_tokens", []) if t["content"] in template]
    return [n for n in names if isinstance(n, str)]


def _slice(net: nn.Module, keep: torch.Tensor) -> None:
    """Keep rows `keep` of the input embedding and of an untied output head; the config says the new size."""
    emb = net.get_input_embeddings()
    emb.weight = nn.Parameter(emb.weight.data[keep].clone())
    emb.num_embeddings = len(keep)
    if emb.padding_idx is not None:
        emb.padding_idx = int((keep == emb.padding_idx).nonzero()[0, 0]) if bool((keep == emb.padding_idx).any()) else None
    head = net.get_output_embeddings()
    tied = getattr(net.config, "tie_word_embeddings", False)
    if head is not None and not tied:
        head.weight = nn.Parameter(head.weight.data[keep].clone())
        if head.bias is not None:
            head.bias = nn.Parameter(head.bias.data[keep].clone())
        head.out_features = len(keep)
    elif head is not None:
        head.weight = emb.weight
        head.out_features = len(keep)
    net.config.vocab_size = len(keep)


def _renumber_ids(cfg: Any, new_id: dict[int, int]) -> None:
    for key in TOKEN_ID_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            setattr(cfg, key, new_id.get(value))
        elif isinstance(value, list):
            setattr(cfg, key, [new_id[v] for v in value if v in new_id])


def vocab_stage(model: str, corpus: list[Path], *, keep: int | None = None, name: str | None = None,
                store: Store | None = None) -> ModelCard:
    """Trim `model`'s vocabulary to the tokens `corpus` uses (the `keep` most frequent, when given) into a new store
    model (default MODEL-vocab-N)."""
    from tokenizers import Tokenizer

    store = store or Store()
    folder, _ = float_parent(store, model)
    tj = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else None
    if tj is None or (why := vocab_ops.check_trimmable(tj)):
        raise SlmkitError(f"{model}'s vocabulary cannot be trimmed: {why if tj else 'it has no tokenizer.json'}",
                          "Trimming needs a `tokenizers` BPE tokenizer (GPT-2 byte-level or SentencePiece-style with byte fallback).")
    if keep is not None and keep < 1:
        raise SlmkitError(f"--keep {keep} is not a number of tokens", "Give --keep a positive count, for example 32000.")
    texts = _corpus(corpus)
    if name is not None:
        validate_name(name)
        store.check_free(name)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    old = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with progress.step(f"Counting the tokens of {len(texts)} corpus texts"):
        encoded = [e.ids for e in old.encode_batch(texts, add_special_tokens=False)]
        counts = Counter(i for ids in encoded for i in ids)
    used = {i for i, _ in counts.most_common(keep)} if keep is not None else set(counts)
    kept = sorted(vocab_ops.closure(tj, used | vocab_ops.floor_ids(tj, _named_specials(tj, tokenizer))))
    vocab_size = int(net.config.vocab_size)
    new_tj = vocab_ops.trimmed(tj, kept)
    new = Tokenizer.from_str(json.dumps(new_tj))
    new_id = {old_i: new_i for new_i, old_i in enumerate(kept)}
    with progress.step("Checking that the corpus encodes as before"):
        for text, ids, got in zip(texts, encoded, (e.ids for e in new.encode_batch(texts, add_special_tokens=False))):
            if keep is None and got != [new_id[i] for i in ids]:
                raise SlmkitError("the trimmed tokenizer encodes the corpus differently (a bug in slmkit's trimming)",
                                  "Report it with the model and corpus; the store is unchanged.")
            if new.decode(got, skip_special_tokens=False) != old.decode(ids, skip_special_tokens=False):
                raise SlmkitError("a corpus text does not decode back to itself through the trimmed vocabulary",
                                  "Report it with the model and corpus; the store is unchanged.")
    _slice(net, torch.tensor(kept))
    _renumber_ids(net.config, new_id)
    if getattr(net, "generation_config", None) is not None:
        _renumber_ids(net.generation_config, new_id)
    name = name or validate_name(f"{model}-vocab-{len(kept) // 1000}k" if len(kept) >= 1000 else f"{model}-vocab-{len(kept)}")
    store.check_free(name)

    def write(staging: Path) -> None:
        with progress.step(f"Writing {name}"):
            net.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))  # config, template and special-token names as they were
            (staging / "tokenizer.json").write_text(json.dumps(new_tj, ensure_ascii=False))
            (staging / VOCAB_MAP).write_text(json.dumps({"kept": kept}))  # GGUF export slices its source's vocabulary
            tcfg_path = staging / "tokenizer_config.json"
            tcfg = json.loads(tcfg_path.read_text())
            tcfg.pop("added_tokens_decoder", None)  # ids of the old vocabulary; transformers reads them from tokenizer.json
            tcfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))

    settings = {"kind": "vocabulary", "corpus": [{"file": str(p), "sha256": sha256_file(p)} for p in corpus],
                "texts": len(texts), "keep": keep, "kept": len(kept), "dropped": vocab_size - len(kept),
                "vocab_before": vocab_size, "corpus_tokens": sum(counts.values())}
    return store.derive(name, write, stage="prune", parent=model, settings=settings, parameters=count_params(net))
