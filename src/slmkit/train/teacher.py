"""The teacher's outputs, computed once and kept on disk: its top-k log-probabilities at every position of every
training window (values float16, token ids int32), keyed by the teacher's and the data's hashes. Several students and
epochs reuse the file, and the teacher is not in memory while a student trains."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmkit import progress
from slmkit.card import ModelCard
from slmkit.errors import SlmkitError
from slmkit.train.data import Windows

TOP_K = 32


@dataclass
class TeacherCache:
    values: torch.Tensor  # (N, T, k) float16 log-probabilities
    ids: torch.Tensor  # (N, T, k) int32 token ids
    path: Path
    key: str

    @property
    def bytes_per_token(self) -> float:
        n, t, _ = self.values.shape
        return (self.values.numel() * self.values.element_size() + self.ids.numel() * self.ids.element_size()) / (n * t)


def cache_key(teacher: ModelCard, data_sha: str, seq_len: int, k: int) -> str:
    """The teacher's file hashes, the data's hash and the shape: a cache made for anything else never matches."""
    h = hashlib.sha256(json.dumps({"teacher": teacher.files, "data": data_sha, "seq_len": seq_len, "k": k}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def compute(model: Any, windows: Windows, k: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities of `model` at every input position of the windows: (N, T, k) each."""
    inputs = windows.ids[:, :-1]  # (N, T)
    vals, ids = [], []
    with torch.inference_mode(), progress.bar("teacher log-probabilities", total=len(inputs)) as advance:
        for i in range(0, len(inputs), batch):
            logits = model(input_ids=inputs[i: i + batch], use_cache=False).logits.float()  # (b, T, V)
            top = torch.topk(torch.log_softmax(logits, -1), k, dim=-1)
            vals.append(top.values.half())
            ids.append(top.indices.int())
            advance(min(batch, len(inputs) - i))
    return torch.cat(vals), torch.cat(ids)


def load_or_compute(cache_dir: Path, key: str, windows: Windows, load_teacher: Any, *, k: int = TOP_K) -> tuple[TeacherCache, bool]:
    """The cache for `key` (checked against the windows' shape), or computed with `load_teacher()` and written
    atomically. Returns (cache, computed)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"teacher-{key}.safetensors"
    n, t = windows.ids.shape[0], windows.ids.shape[1] - 1
    if path.is_file():
        try:
            data = load_file(str(path))
        except Exception as exc:  # a truncated or damaged file: say so and make it again
            progress.note(f"teacher cache {path} is unreadable ({type(exc).__name__}); computing it again")
        else:
            if tuple(data["values"].shape) == (n, t, k):
                return TeacherCache(data["values"], data["ids"], path, key), False
            raise SlmkitError(f"the teacher cache {path} does not fit these windows ({tuple(data['values'].shape)} vs {(n, t, k)})",
                              f"Remove {path} and run again.")
    teacher = load_teacher()
    values, ids = compute(teacher, windows, k)
    del teacher
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({"values": values.contiguous(), "ids": ids.contiguous()}, str(tmp), metadata={"key": key, "k": str(k)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return TeacherCache(values, ids, path, key), True
