"""Training data: read the files people have, tokenize them with a loss mask, pack them into windows, split.

Readers (by extension, or `fmt`):
- `.txt`: plain text; documents are separated by blank lines ... or the whole file is one document;
- `.jsonl` / `.json`: rows of `{text}`, chat `{messages: [{role, content}]}`, or Alpaca's `{instruction, input, output}`
  (a JSON array too);
- `.csv` / `.tsv`: one column of text (`text_column`), or a prompt and a response column (as chat turns; a text and
  a label column for classification);
- a folder written by Hugging Face `datasets` (`save_to_disk`): a text and a label column (class ids become their
  names).
Classification rows (`label_column`) are a user turn (the text) and an assistant turn (the label); for training they
are one row per window (`pad_rows`), never packed, so each label is learned from its own text alone.
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

from slmkit.data.classify import check_format, check_labels, plain_answer, plain_prompt
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


def labelled(text: Any, label: Any, where: str) -> Example:
    """A classification row: the text as the user's turn, the label as the answer."""
    if not isinstance(text, str) or not text.strip() or label is None or not str(label).strip():
        raise DataError(f"{where}: a classification row needs a text and a label, got {str(text)[:60]!r} / {label!r}",
                        "Fix or drop the row.")
    return Example(messages=(("user", text), ("assistant", str(label).strip())))


def read_hf_dataset(path: Path, text_column: str, label_column: str) -> list[Example]:
    """Rows of a dataset saved with Hugging Face `datasets` (`save_to_disk`); a ClassLabel column gives names."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path} holds several splits ({', '.join(splits)})", f"Give one of them: {path / (splits or ['train'])[0]}")
    ds = datasets.load_from_disk(str(path))
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r}", f"Columns: {', '.join(ds.column_names)}; pass --text-column / --label-column.")
    feature = ds.features[label_column]
    names = getattr(feature, "names", None)
    return [labelled(row[text_column], names[row[label_column]] if names and isinstance(row[label_column], int) else row[label_column],
                     f"{path}[{i}]") for i, row in enumerate(ds)]


def read_examples(path: Path, *, fmt: str | None = None, text_column: str | None = None,
                  prompt_column: str | None = None, response_column: str | None = None,
                  label_column: str | None = None) -> list[Example]:
    """Every usable example of one file; a bad row fails with its place and what to do. With `label_column`, rows
    are classification rows: the text (`text_column`, default "text") and its label."""
    path = Path(path).expanduser()
    if label_column:
        text_column = text_column or prompt_column or "text"
        if path.is_dir():
            if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
                raise DataError(f"{path} is a folder but not a saved Hugging Face dataset", "Give a file, or a folder from datasets' save_to_disk.")
            out = read_hf_dataset(path, text_column, label_column)
            if not out:
                raise DataError(f"{path} has no rows", "Give a dataset with rows.")
            return out
        if _format_of(path, fmt) == "csv":
            prompt_column, response_column, text_column = text_column, label_column, None
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
            placed = [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
        else:
            placed = list(json_objects(raw.splitlines(), path, DataError))
        out = [labelled(row.get(text_column), row.get(label_column), where) if label_column and isinstance(row, dict)
               else _row_example(row, where) for where, row in placed]
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


def _shuffled_by_label(examples: list[Example], seed: int) -> list[list[Example]]:
    """The rows of each label (label_of), labels in sorted order, each shuffled by a generator seeded by `seed` and
    the label (so a label's order does not depend on the others)."""
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(label_of(ex), []).append(ex)
    out = []
    for label in sorted(by_label):
        rows = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(rows)
        out.append(rows)
    return out


def _leak_free(train: list[Example], held: list[Example]) -> tuple[list[Example], list[Example], int]:
    """(train without the rows whose prompt text is also held out, held out, how many were dropped)."""
    seen = {prompt_of(ex) for ex in held}
    kept = [ex for ex in train if prompt_of(ex) not in seen]
    return kept, held, len(train) - len(kept)


def stratified_split(examples: list[Example], held_out: float, seed: int = 0) -> tuple[list[Example], list[Example], int]:
    """(train, held out, rows dropped from train): within each label (label_of), a shuffle seeded by `seed` and the
    label, and round(held_out x rows) held out (at least one when the label has two or more rows), so every label is
    on both sides in its proportion; a training row whose prompt text is also a held-out prompt is dropped (no
    held-out text is ever trained on). Deterministic: the same file and seed give the same split."""
    if not 0 < held_out < 1:
        raise DataError(f"the held-out share must be between 0 and 1, not {held_out}", "For example 0.2 holds out 20%.")
    train, held = [], []
    for rows in _shuffled_by_label(examples, seed):
        k = round(held_out * len(rows))
        k = max(k, 1) if len(rows) >= 2 else 0
        held += rows[:k]
        train += rows[k:]
    return _leak_free(train, held)


def stratified_folds(examples: list[Example], k: int, seed: int = 0) -> list[tuple[list[Example], list[Example], int]]:
    """k-fold cross-validation: (train, held out, rows dropped from train) per fold; within each label a shuffle
    seeded by `seed` and the label, dealt round-robin into the folds (from a fold that differs per label, so the
    folds' sizes differ by at most one), every row held out exactly once; training rows whose text is held out are
    dropped, as in stratified_split."""
    if not 2 <= k <= len(examples):
        raise DataError(f"--folds must be between 2 and the number of rows ({len(examples)}), not {k}", "Five folds is usual.")
    folds: list[list[Example]] = [[] for _ in range(k)]
    offset = 0
    for rows in _shuffled_by_label(examples, seed):
        for i, ex in enumerate(rows):
            folds[(offset + i) % k].append(ex)
        offset += len(rows)
    return [_leak_free([ex for j, f in enumerate(folds) if j != i for ex in f], held) for i, held in enumerate(folds)]


def to_jsonl(examples: list[Example], labelled_rows: bool = False) -> str:
    """Rows in the chat / text JSON lines read_examples reads back; `labelled_rows`: classification rows as
    {"text", "label"} (read back with label_column="label")."""
    def row(ex: Example) -> dict[str, Any]:
        if ex.text is not None:
            return {"text": ex.text}
        if labelled_rows:
            return {"text": prompt_of(ex), "label": label_of(ex)}
        return {"messages": [{"role": r, "content": c} for r, c in ex.messages]}
    return "".join(json.dumps(row(ex), ensure_ascii=False) + "\n" for ex in examples)


def encode_example(tokenizer: Any, ex: Example, prompt_format: str = "chat") -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one example: every token of a text; only the assistant turns of a conversation (rendered
    with the tokenizer's chat template), each turn's template tokens included so the model learns where turns end.
    prompt_format "plain" (data/classify.py): the prompt as "TEXT\nLabel:" and the answer after it, then EOS."""
    eos = tokenizer.eos_token_id
    if prompt_format == "plain" and ex.text is None:
        prompt = tokenizer.encode(plain_prompt(prompt_of(ex)), add_special_tokens=True)
        answer = tokenizer.encode(plain_answer(label_of(ex)), add_special_tokens=False) + ([eos] if eos is not None else [])
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)
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


def pad_rows(sequences: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Windows:
    """One sequence per window, right-padded with `pad_id` (mask 0) to the longest (at most seq_len + 1 tokens; a
    longer one keeps its last seq_len + 1, where its answer is). Causal attention never lets padding reach a real
    token, and the loss trims the columns no row learns."""
    width = min(seq_len + 1, max(len(ids) for ids, _ in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (N, T + 1)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, m) in enumerate(sequences):
        seq, m = seq[-width:], m[-width:]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(m)] = torch.tensor(m)
    return Windows(ids, mask)


def hash_files(paths: list[Path], settings: dict[str, Any]) -> str:
    """What identifies a training set: the files' bytes and how they were read."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:  # a saved dataset: its files
            if f.is_file():
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build(tokenizer: Any, paths: list[Path], *, seq_len: int, valid_fraction: float = 0.05, seed: int = 0,
          prompt_format: str | None = None, **read_kw: Any) -> tuple[Windows, Windows, dict[str, Any]]:
    """Read, tokenize, shuffle (by seed), split by example into training and validation, pack each. With a
    `label_column` (classification), each row is its own window and info["labels"] is the label set."""
    examples: list[Example] = []
    for p in paths:
        examples += read_examples(p, **read_kw)
    classify = bool(read_kw.get("label_column"))
    fmt = prompt_format or "chat"
    if classify:
        check_format(fmt)
        labels = check_labels(sorted({label_of(e) for e in examples}))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(len(examples) * valid_fraction)) if valid_fraction > 0 and len(examples) > 1 else 0
    valid_ex = [examples[i] for i in order[:n_valid]]
    train_ex = [examples[i] for i in order[n_valid:]]
    if classify:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train = pad_rows([encode_example(tokenizer, e, fmt) for e in train_ex], seq_len, pad)
        valid = pad_rows([encode_example(tokenizer, e, fmt) for e in valid_ex], seq_len, pad) if valid_ex else Windows(
            torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))
    else:
        train = pack([encode_example(tokenizer, e) for e in train_ex], seq_len)
        try:
            valid = pack([encode_example(tokenizer, e) for e in valid_ex], seq_len)
        except DataError:  # too little held-out text for one window: no validation
            valid = Windows(torch.zeros(0, seq_len + 1, dtype=torch.long), torch.zeros(0, seq_len + 1, dtype=torch.long))
    info = {"files": [str(p) for p in paths], "examples": len(examples), "valid_examples": n_valid,
            "train_windows": len(train), "valid_windows": len(valid), "train_tokens": train.tokens, "seq_len": seq_len,
            "seed": seed, "sha256": hash_files(paths, {"seq_len": seq_len, "valid_fraction": valid_fraction, "seed": seed,
                                                     **({"prompt_format": fmt} if classify else {}), **read_kw})}
    if classify:
        info["labels"] = labels
        info["prompt_format"] = fmt
    return train, valid, info
