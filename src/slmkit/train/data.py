"""Training data: read the files people have, tokenize them with a loss mask, pack them into windows, split.

Readers (by extension, or `fmt`):
- `.txt`: plain text; documents are separated by blank lines ... or the whole file is one document;
- `.jsonl` / `.json`: rows of `{text}`, chat `{messages: [{role, content}]}`, or Alpaca's `{instruction, input, output}`
  (a JSON array too);
- `.csv` / `.tsv`: one column of text (`text_column`), or a prompt and a response column (as chat turns; a text and
  a label column for classification).
Chat rows go through the model's chat template and only the assistant's tokens carry loss. Everything is
deterministic: the split and the order follow `seed`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmkit.data.jsonl import json_objects
from slmkit.errors import SlmkitError

FORMATS = ("text", "jsonl", "csv")


class DataError(SlmkitError):
    pass


@dataclass(frozen=True)
class Example:
    """One document: plain text, or a conversation (the assistant's turns are what is learned)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] = ()


@dataclass
class Windows:
    """Packed token windows: ids (N, T) and a loss mask (N, T) where 1 marks a position whose token is learned."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r}", f"Formats: {', '.join(FORMATS)}")
        return fmt
    ext = path.suffix.lower()
    return {".txt": "text", ".md": "text", ".raw": "text", ".tokens": "text", ".jsonl": "jsonl", ".json": "jsonl",
            ".csv": "csv", ".tsv": "csv"}.get(ext, "text")


def _row_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "Each row is {text}, {messages} or {instruction, input, output}.")
    if isinstance(row.get("text"), str):
        return Example(text=row["text"])
    if isinstance(row.get("messages"), list):
        turns = []
        for m in row["messages"]:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: a message is not {{role, content}}: {m!r}"[:300], "Fix the row.")
            turns.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            raise DataError(f"{where}: the conversation has no assistant turn to learn", "Add the answer as an assistant message.")
        return Example(messages=tuple(turns))
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return Example(messages=(("user", prompt), ("assistant", row["output"])))
    raise DataError(f"{where}: no 'text', 'messages' or 'instruction'/'output' field (fields: {sorted(row)[:8]})",
                    "Give rows as {\"text\": ...}, {\"messages\": [...]} or Alpaca's {instruction, input, output}.")


def read_examples(path: Path, *, fmt: str | None = None, text_column: str | None = None,
                  prompt_column: str | None = None, response_column: str | None = None) -> list[Example]:
    """Every usable example of one file; a bad row fails with its place and what to do."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} not found", "Give existing text, JSON lines or CSV files.")
    kind = _format_of(path, fmt)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", "Convert it to UTF-8.") from exc
    out: list[Example] = []
    if kind == "text":
        docs = [d.strip() for d in raw.replace("\r\n", "\n").split("\n\n")]
        out = [Example(text=d) for d in docs if d]
    elif kind == "jsonl":
        stripped = raw.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "Fix the file.") from exc
            out = [_row_example(r, f"{path}[{i}]") for i, r in enumerate(rows)]
        else:
            out = [_row_example(row, where) for where, row in json_objects(raw.splitlines(), path, DataError)]
    else:
        reader = csv.DictReader(raw.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        cols = reader.fieldnames or []
        wanted = [c for c in (text_column, prompt_column, response_column) if c]
        if not wanted:
            raise DataError(f"{path} is CSV: say which column holds the text", f"Pass --text-column, or --prompt-column and --response-column (columns: {', '.join(cols)}).")
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise DataError(f"{path} has no column {missing[0]!r}", f"Columns: {', '.join(cols)}")
        for row in reader:
            if text_column:
                if row[text_column].strip():
                    out.append(Example(text=row[text_column]))
            elif row[prompt_column].strip() and row[response_column].strip():
                out.append(Example(messages=(("user", row[prompt_column]), ("assistant", row[response_column]))))
    if not out:
        raise DataError(f"{path} has no usable rows", "Give a file with text (blank lines separate documents in .txt).")
    return out


def label_of(ex: Example) -> str:
    """What a row is labelled with: its last assistant turn (a classification row's answer), '' for plain text."""
    return next((c for r, c in reversed(ex.messages) if r == "assistant"), "")


def prompt_of(ex: Example) -> str:
    """The text a row asks about (everything but its answer), for the leak check."""
    return ex.text if ex.text is not None else "\n".join(c for r, c in ex.messages if r != "assistant")


def stratified_split(examples: list[Example], held_out: float, seed: int = 0) -> tuple[list[Example], list[Example], int]:
    """(train, held out, rows dropped from train): within each label (label_of), a shuffle seeded by `seed` and the
    label, and round(held_out x rows) held out (at least one when the label has two or more rows), so every label is
    on both sides in its proportion; a training row whose prompt text is also a held-out prompt is dropped (no
    held-out text is ever trained on). Deterministic: the same file and seed give the same split."""
    if not 0 < held_out < 1:
        raise DataError(f"the held-out share must be between 0 and 1, not {held_out}", "For example 0.2 holds out 20%.")
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(label_of(ex), []).append(ex)
    train, held = [], []
    for label in sorted(by_label):
        rows = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(rows)
        k = round(held_out * len(rows))
        k = max(k, 1) if len(rows) >= 2 else 0
        held += rows[:k]
        train += rows[k:]
    seen = {prompt_of(ex) for ex in held}
    kept = [ex for ex in train if prompt_of(ex) not in seen]
    return kept, held, len(train) - len(kept)


def to_jsonl(examples: list[Example]) -> str:
    """Rows in the chat / text JSON lines read_examples reads back."""
    return "".join(json.dumps({"text": ex.text} if ex.text is not None else
                              {"messages": [{"role": r, "content": c} for r, c in ex.messages]}, ensure_ascii=False) + "\n"
                   for ex in examples)


def encode_example(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one example: every token of a text; only the assistant turns of a conversation (rendered
    with the tokenizer's chat template), each turn's template tokens included so the model learns where turns end."""
    eos = tokenizer.eos_token_id
    if ex.text is not None:
        ids = tokenizer.encode(ex.text, add_special_tokens=False) + ([eos] if eos is not None else [])
        return ids, [1] * len(ids)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat rows need a model with a chat template; this one has none", "Give plain text rows ({text}) for a base model.")
    messages = [{"role": r, "content": c} for r, c in ex.messages]
    ids: list[int] = []
    mask: list[int] = []
    for i, (role, _) in enumerate(ex.messages):
        # the rendered text up to and including turn i, minus what came before: this turn's tokens
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        new = tokenizer.encode(upto, add_special_tokens=False)[len(ids):]
        ids += new
        mask += [1 if role == "assistant" else 0] * len(new)
    return ids, mask


def pack(sequences: list[tuple[list[int], list[int]]], seq_len: int) -> Windows:
    """Concatenate the sequences and cut windows of seq_len + 1 tokens (inputs and shifted targets); the mask is the
    targets'. The tail shorter than a window is dropped."""
    flat_ids: list[int] = []
    flat_mask: list[int] = []
    for ids, mask in sequences:
        flat_ids += ids
        flat_mask += mask
    n = (len(flat_ids) - 1) // seq_len
    if n < 1:
        raise DataError(f"the data holds {len(flat_ids)} tokens, less than one window of {seq_len + 1}",
                        "Give more text, or a smaller --seq-len.")
    ids = torch.tensor(flat_ids[: n * seq_len + 1])
    mask = torch.tensor(flat_mask[: n * seq_len + 1])
    windows = torch.stack([ids[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])  # (N, T + 1)
    masks = torch.stack([mask[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])
    return Windows(windows, masks)


def hash_files(paths: list[Path], settings: dict[str, Any]) -> str:
    """What identifies a training set: the files' bytes and how they were read."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def build(tokenizer: Any, paths: list[Path], *, seq_len: int, valid_fraction: float = 0.05, seed: int = 0,
          **read_kw: Any) -> tuple[Windows, Windows, dict[str, Any]]:
    """Read, tokenize, shuffle (by seed), split by example into training and validation, pack each."""
    examples: list[Example] = []
    for p in paths:
        examples += read_examples(p, **read_kw)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(len(examples) * valid_fraction)) if valid_fraction > 0 and len(examples) > 1 else 0
    valid_ex = [examples[i] for i in order[:n_valid]]
    train_ex = [examples[i] for i in order[n_valid:]]
    train = pack([encode_example(tokenizer, e) for e in train_ex], seq_len)
    try:
        valid = pack([encode_example(tokenizer, e) for e in valid_ex], seq_len)
    except DataError:  # too little held-out text for one window: no validation
        valid = Windows(torch.zeros(0, seq_len + 1, dtype=torch.long), torch.zeros(0, seq_len + 1, dtype=torch.long))
    info = {"files": [str(p) for p in paths], "examples": len(examples), "valid_examples": n_valid,
            "train_windows": len(train), "valid_windows": len(valid), "train_tokens": train.tokens, "seq_len": seq_len,
            "seed": seed, "sha256": hash_files(paths, {"seq_len": seq_len, "valid_fraction": valid_fraction, "seed": seed, **read_kw})}
    return train, valid, info
