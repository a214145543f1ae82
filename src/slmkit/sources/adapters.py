"""LoRA adapters in the store: a folder with peft's `adapter_config.json` and `adapter_model.safetensors` (what peft
and other tools read), the base's config and tokenizer beside them, and a card naming the base and the hashes of its
files. The base is another store model (a sibling folder); loading checks that it is the very base the adapter was
trained on, then merges the adapter into it in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmkit.card import read_card
from slmkit.errors import SlmkitError
from slmkit.sources.forms import ADAPTER_CONFIG, is_prompt_tuning, is_quantized, load_quantized



def not_prompt_tuning(folder: Path, what: str) -> None:
    if is_prompt_tuning(folder):
        raise SlmkitError(f"{Path(folder).name} is a prompt-tuning adapter (a learned prefix), which {what}",
                          "Run, chat, eval or serve it as it is (on the torch backend), or train a LoRA adapter "
                          "(slmkit finetune --method lora) where weights are needed.")


def base_of(folder: Path) -> tuple[str, Path]:
    """(base model name, its store folder), checked against the hashes the adapter recorded. The base is the
    adapter's parent in its lineage (its card); peft's base_model_name_or_path holds the base's folder, so that peft
    and transformers load the adapter too (an older adapter held the store name there)."""
    folder = Path(folder)
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = read_card(folder).parent or Path(str(cfg.get("base_model_name_or_path") or "")).name
    base_folder = folder.parent / base
    if not base or not (base_folder / "card.json").is_file():
        raise SlmkitError(f"the adapter {folder.name} needs its base model {base!r}, which is not in the store",
                          f"Import or make {base!r} again (the adapter was trained on it), or remove the adapter.")
    want = read_card(folder).settings.get("base_files")
    if want is not None and read_card(base_folder).files != want:
        raise SlmkitError(f"the store model {base!r} is not the base the adapter {folder.name} was trained on (its files differ)",
                          f"Restore the original {base!r}, or train the adapter again on the current one.")
    return base, base_folder


def load_merged(folder: Path, *, dtype: Any = "auto") -> tuple[Any, Any]:
    """(model with the adapter merged in, tokenizer): the base loaded, the adapter applied and folded into its weights."""
    from peft import PeftModel

    from slmkit.sources.hf_dir import load_float, load_tokenizer

    from slmkit.layers.integer import to_float

    not_prompt_tuning(folder, "cannot be merged into the weights")
    _, base_folder = base_of(folder)
    if is_quantized(base_folder):  # a QLoRA adapter over an integer child: merged into its dequantized weights
        net, tokenizer = to_float(load_quantized(base_folder)), load_tokenizer(base_folder)
    else:
        net, tokenizer = load_float(base_folder, dtype=dtype)
    merged = PeftModel.from_pretrained(net, str(folder)).merge_and_unload()
    return merged.eval(), tokenizer


def load_prompt_tuned(folder: Path) -> tuple[Any, Any, list[int]]:
    """(base model with the virtual tokens attached, tokenizer, the virtual tokens' ids to put before every prompt)."""
    from safetensors.torch import load_file

    from slmkit.layers.prompt import attach_prompt
    from slmkit.sources.hf_dir import load_float

    _, base_folder = base_of(folder)
    net, tokenizer = load_float(base_folder)  # prompt tuning starts from float models only (compress/parents.py)
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    prompt = tensors.get("prompt_embeddings")
    if prompt is None or prompt.ndim != 2 or prompt.shape[1] != net.config.hidden_size:
        raise SlmkitError(f"the prompt-tuning adapter {Path(folder).name} has no prompt_embeddings of width "
                          f"{net.config.hidden_size}", "Train it again with slmkit finetune --method prompt.")
    return net.eval(), tokenizer, attach_prompt(net, prompt)


LAYER_PREFIX = "base_model.model.model.layers."  # peft's names of the decoder blocks' factors


def per_row_problem(folder: Path) -> str | None:
    """Why a LoRA adapter cannot be applied per row over a shared base (None: it can): DoRA, prompt tuning, trained
    extra modules or factors outside the decoder blocks need the adapter merged (served on its own)."""
    from safetensors import safe_open

    cfg = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save"):
        return "not a plain LoRA adapter (DoRA, prompt tuning or trained extra modules)"
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as f:
        outside = [k for k in f.keys() if not k.startswith(LAYER_PREFIX)]
    return f"it adapts layers outside the decoder blocks ({outside[0]})" if outside else None


def lora_factors(folder: Path, layers: list[Any], dtype: Any, groups: dict[str, tuple[str, ...]] | None = None,
                 ) -> dict[tuple[str, int], tuple[Any, Any]]:
    """A LoRA adapter's factors for the engine's fused groups (layers/multi_lora.py; `groups`: the family's modules
    per group, engine/families.Family.lora_groups, default Llama's), per block of `layers` (the base's decoder
    blocks): what serving several adapters over one loaded base needs."""
    from safetensors.torch import load_file

    from slmkit.layers.multi_lora import GROUPS, fused_pair

    name = Path(folder).name
    problem = per_row_problem(folder)
    if problem:
        raise SlmkitError(f"{name} cannot share a base in the batch: {problem}", "Serve it on its own (merged).")
    cfg = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    out: dict[tuple[str, int], tuple[Any, Any]] = {}
    for i, block in enumerate(layers):
        for group, parts in (groups or GROUPS).items():
            found = []
            for part in parts:
                key = f"{LAYER_PREFIX}{i}.{part}"
                a, b = tensors.pop(f"{key}.lora_A.weight", None), tensors.pop(f"{key}.lora_B.weight", None)
                found.append((a, b, scale) if a is not None and b is not None else None)
            mods = [block.get_submodule(p) for p in parts]
            pair = fused_pair(found, [m.out_features for m in mods], mods[0].in_features, dtype)
            if pair is not None:
                out[(group, i)] = pair
    if tensors:
        raise SlmkitError(f"{name} has factors this engine does not apply ({next(iter(tensors))})", "Serve it on its own (merged).")
    return out
