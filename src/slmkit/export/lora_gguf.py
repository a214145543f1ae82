"""A LoRA adapter as a GGUF adapter file that llama.cpp loads beside its base (`llama-cli -m base.gguf --lora
adapter.gguf`, llama-cpp-python's `lora_path`, Ollama's `ADAPTER` line), in the layout of llama.cpp's own
convert_lora_to_gguf.py: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and per adapted weight W
the tensors "W.lora_a" (r, in) and "W.lora_b" (out, r). llama.cpp scales by alpha / r; q and k rows are reordered
for its rotary layout, as the base's weights are."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slmkit.errors import SlmkitError
from slmkit.export.gguf import check_exportable, permute_rotary, tensor_names
from slmkit.gguf_tables import ARCHITECTURES
from slmkit.sources.forms import ADAPTER_CONFIG
from slmkit.card import read_config

PEFT_PREFIX = "base_model.model."


def write_lora_gguf(adapter: Path, out: Path, *, name: str) -> int:
    """Write the peft LoRA adapter in folder `adapter` (whose config.json is its base's) to `out`; returns the
    number of adapted weights."""
    import gguf
    from safetensors import safe_open

    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise SlmkitError(f"{adapter.name} is not a plain LoRA adapter ({cfg.get('peft_type')}, DoRA {bool(cfg.get('use_dora'))})",
                          "Only LoRA adapters have a GGUF form; merge it instead: slmkit export without --lora-adapter.")
    config = read_config(adapter)
    spec = ARCHITECTURES[check_exportable(config)]
    arch_key, permute = spec.arch, spec.permute
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(r) if cfg.get("use_rslora") else 1.0)  # llama.cpp scales by alpha / r
    names = tensor_names(config)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_key)])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="numpy") as f:
        for key in f.keys():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.weight"
                if key.endswith(marker):
                    base_key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
                    base_key = base_key[: -len(marker)] + ".weight"
                    pairs.setdefault(base_key, {})[part] = f.get_tensor(key).astype(np.float32)
                    break
            else:
                raise SlmkitError(f"the adapter holds a tensor that is not a LoRA factor: {key!r}",
                                  "Merge it instead: slmkit export without --lora-adapter.")
    for base_key, parts in sorted(pairs.items()):
        target = names.get_name(base_key, try_suffixes=(".weight",))
        if target is None or set(parts) != {"lora_A", "lora_B"}:
            raise SlmkitError(f"no GGUF name (or a missing factor) for the adapted weight {base_key!r}", "This adapter targets weights llama.cpp does not name.")
        a, b = parts["lora_A"], parts["lora_B"]  # (r, in), (out, r)
        if permute and base_key.endswith("q_proj.weight"):
            b = permute_rotary(b, n_head)
        elif permute and base_key.endswith("k_proj.weight"):
            b = permute_rotary(b, n_kv)
        w.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a))
        w.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(pairs)
