"""A fresh student from a config: the teacher's architecture with fewer layers, a narrower MLP, fewer heads or a
smaller hidden size (`new:layers=12,intermediate=768`), initialised from the teacher where shapes allow: every
tensor whose shape matches is copied (embeddings and norms, and block i from the teacher's block at the same relative
depth); the rest starts random. For a student that is a slimmer copy of the teacher, pruning keeps more
(`slmkit prune --structured ...` ranks what to keep); this is for shapes pruning cannot reach."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slmkit.errors import SlmkitError
from slmkit.layers.walk import decoder_blocks

KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
        "heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}


def parse_spec(spec: str) -> dict[str, int]:
    """'new:layers=12,intermediate=768' -> {'num_hidden_layers': 12, 'intermediate_size': 768}."""
    body = spec.removeprefix("new:")
    out: dict[str, int] = {}
    for part in filter(None, body.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in KEYS or not value.strip().isdigit() or int(value) < 1:
            raise SlmkitError(f"cannot read {part!r} in the student spec {spec!r}",
                              f"Write new:KEY=N,... with keys {', '.join(KEYS)}, e.g. new:layers=12,intermediate=768.")
        out[KEYS[key.strip()]] = int(value)
    if not out:
        raise SlmkitError(f"the student spec {spec!r} changes nothing", "Give at least one of " + ", ".join(KEYS) + ".")
    return out


def fresh_student(teacher: nn.Module, overrides: dict[str, int], *, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The student model and what was copied from the teacher."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if "hidden_size" in overrides and "num_attention_heads" not in overrides:
        cfg.num_attention_heads = max(1, overrides["hidden_size"] // head_dim)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise SlmkitError(f"{cfg.num_attention_heads} heads do not split into {cfg.num_key_value_heads} KV groups",
                          "Give heads as a multiple of kv_heads.")
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads if "hidden_size" in overrides else head_dim
    for key, value in list(vars(cfg).items()):  # per-layer lists follow the new depth
        if isinstance(value, list) and len(value) == teacher.config.num_hidden_layers and key != "architectures":
            setattr(cfg, key, [value[round(i * (len(value) - 1) / max(cfg.num_hidden_layers - 1, 1))] for i in range(cfg.num_hidden_layers)])
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    t_name, t_blocks = decoder_blocks(teacher)
    s_name, s_blocks = decoder_blocks(student)
    source = {i: round(i * (len(t_blocks) - 1) / max(len(s_blocks) - 1, 1)) for i in range(len(s_blocks))}
    t_state = teacher.state_dict()
    copied, total = 0, 0
    with torch.no_grad():
        for key, p in student.state_dict().items():
            total += 1
            t_key = key
            prefix = s_name + "."
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                t_key = f"{t_name}.{source[int(index)]}.{rest}"
            if t_key in t_state and t_state[t_key].shape == p.shape:
                p.copy_(t_state[t_key])
                copied += 1
    return student, {"config": {k: getattr(cfg, v) for k, v in KEYS.items()}, "copied_tensors": copied,
                     "tensors": total, "block_sources": source}
