"""What a store folder holds, asked in one place: its form (FORMS), each form's test, and the loaders of the forms
slmkit writes in a layout of its own. Every "which kind of model is this" question asks form_of (or one of the tests
below), so a new form is one entry here and one loader.

- router: router.json (a small and a large model with a policy, made by `slmkit route calibrate`) beside a
  config.json that other loaders refuse;
- mixture: mixture.json (specialists of one tokenizer mixed by total probability, made by `slmkit mix`), likewise;
- ngram: model.arpa (a smoothed n-gram model over a tokenizer's ids, made by `slmkit ngram`) with that tokenizer, likewise;
- prompt-tuned, adapter: peft's adapter_config.json (a learned prefix; a LoRA adapter over a base store model);
- integer: config.json with QUANT_KEY (`slmkit quantize`: compressed-tensors' layout, or slmkit's own where none fits);
- low-rank: config.json with LOWRANK_KEY (`slmkit lowrank`: factorized linear layers);
- gguf: GGUF weights only (an export installed back into the store);
- float: safetensors weights transformers reads (an import, or a float stage's child).
A float, integer or low-rank folder may hold a GGUF beside its weights (has_gguf): the llama.cpp engine runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from slmkit.card import GUARD_KEY, read_config
from slmkit.config import settings
from slmkit.errors import SlmkitError
from slmkit.layers import integer
from slmkit.layers.integer import COMPUTE, INT8_ACTIVATIONS, SCHEME_BITS, HeadEmbedding, Int4Linear, W8A8Linear, layer_class
from slmkit.layers.lowrank import LowRankLinear
from slmkit.layers.walk import empty_skeleton, set_module
from slmkit.sources import ct_layout
from slmkit.sources.hf_dir import model_config

FORMS = ("router", "mixture", "ngram", "prompt-tuned", "adapter", "integer", "low-rank", "gguf", "float")
QUANT_KEY = "slmkit_quantization"  # config.json: how `slmkit quantize` made an integer child
LOWRANK_KEY = "slmkit_lowrank"  # config.json: the ranks of `slmkit lowrank`'s factorized layers
ADAPTER_CONFIG = "adapter_config.json"
PROMPT_TUNING = "PROMPT_TUNING"  # peft's type of a learned prefix (the rest are LoRA)
ROUTER_FILE = "router.json"
VOCAB_MAP = "vocab_map.json"  # a vocabulary-trimmed model (slmkit prune --vocab): {"kept": the parent's ids, in new-id order}
ROUTER_CONFIG = {"architectures": ["SlmkitRouter"], "model_type": "slmkit-router",
                 "note": "a slmkit router (router.json), not model weights: serve it with `slmkit serve NAME`"}
MIXTURE_FILE = "mixture.json"  # {"format": 1, "specialists": [store names], "prior": [weights], "share": float}
MIXTURE_CONFIG = {"architectures": ["SlmkitMixture"], "model_type": "slmkit-mixture",
                  "note": "a slmkit mixture of specialists (mixture.json) over other store models: run it with slmkit"}
NGRAM_FILE = "model.arpa"
NGRAM_KEY = "slmkit_ngram"  # config.json: {"order", "vocab_size", "words", "context_length"} of `slmkit ngram`'s model
NGRAM_CONFIG = {"architectures": ["SlmkitNgram"], "model_type": "slmkit-ngram",
                "note": "a slmkit n-gram model (model.arpa, ARPA format, over this tokenizer's ids): run it with slmkit"}


def is_router(folder: Path) -> bool:
    return (Path(folder) / ROUTER_FILE).is_file()


def read_router(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / ROUTER_FILE).read_text())


def is_mixture(folder: Path) -> bool:
    return (Path(folder) / MIXTURE_FILE).is_file()


def read_mixture(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MIXTURE_FILE).read_text())


def is_ngram(folder: Path) -> bool:
    return (Path(folder) / NGRAM_FILE).is_file()


def form_of(folder: Path) -> str:
    """The form a store folder holds (one of FORMS)."""
    folder = Path(folder)
    if is_router(folder):
        return "router"
    if is_mixture(folder):
        return "mixture"
    if is_ngram(folder):
        return "ngram"
    if is_prompt_tuning(folder):
        return "prompt-tuned"
    if is_adapter(folder):
        return "adapter"
    if is_quantized(folder):
        return "integer"
    if is_lowrank(folder):
        return "low-rank"
    if has_gguf(folder) and not any(folder.glob("*.safetensors")):
        return "gguf"
    return "float"


def has_gguf(folder: Path) -> bool:
    return any(Path(folder).glob("*.gguf"))


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def is_prompt_tuning(folder: Path) -> bool:
    """A peft prompt-tuning adapter: a learned prefix of virtual tokens, not a change to any weight."""
    return is_adapter(folder) and json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("peft_type") == PROMPT_TUNING


def is_quantized(folder: Path) -> bool:
    return (folder / "config.json").is_file() and QUANT_KEY in read_config(folder)


def is_standard(folder: Path) -> bool:
    """Whether a quantized child is saved in compressed-tensors' layout that other tools read (not AWQ-smoothed,
    not from slmkit <= 0.5)."""
    config = read_config(folder)
    return "quantization_config" in config and GUARD_KEY not in config


def is_lowrank(folder: Path) -> bool:
    return (Path(folder) / "config.json").is_file() and LOWRANK_KEY in read_config(folder)


def load_quantized(folder: Path) -> nn.Module:
    """Rebuild the architecture from config.json, swap in quantized shells, fill them from the saved integers."""
    config = model_config(folder)
    info = getattr(config, QUANT_KEY)
    standard = getattr(config, "quantization_config", None) is not None  # else the layout of slmkit <= 0.5
    if standard:
        del config.quantization_config  # the skeleton is float; the integer layers are ours
    # the float skeleton is built without memory, then the saved tensors are assigned in place: no full-size
    # float copy ever exists
    model = empty_skeleton(config, torch.float32)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for name in info["modules"]:
        lin = model.get_submodule(name)
        own = (info.get("head") or {}).get("scheme") if name == (info.get("head") or {}).get("module") else info["scheme"]
        cls = layer_class(own)
        if SCHEME_BITS[own] == 8:
            shell = cls(lin.in_features, lin.out_features, lin.bias is not None)
        else:
            shell = cls(lin.in_features, lin.out_features, lin.bias is not None, info["group_size"])
        if info.get("smooth"):
            shell.smooth = torch.ones(lin.in_features, dtype=COMPUTE)
        if standard:
            local = {k[len(name) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(name + ".")]}
            if "weight_scale" not in local:
                raise SlmkitError(f"the quantized file in {folder} lacks {name}", "Quantize the model again.")
            ct_layout.fill_layer(shell, local, ct_layout.stored_scheme(info, name))
            if info.get("smooth"):
                shell.smooth = local["smooth"].to(COMPUTE)
        set_module(model, name, shell)
    if info.get("embedding"):  # the token embedding is read from the integer head (no table in the file)
        dtype = torch.float32 if info["scheme"] in INT8_ACTIVATIONS else COMPUTE
        model.set_input_embeddings(HeadEmbedding(model.get_submodule(info["embedding"]["from"]), model.get_input_embeddings(), dtype))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if standard:
        missing = [k for k in missing if k.rpartition(".")[0] not in info["modules"]]
    if missing or unexpected:
        raise SlmkitError(f"the quantized weights in {folder} do not match the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}", "Quantize the model again.")
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise SlmkitError(f"the quantized file in {folder} lacks {leftover[:3]}", "Quantize the model again.")
    if any(isinstance(m, W8A8Linear) for m in model.modules()):  # kernels timed once per machine and shape, kept for the next load
        integer.use_kernel_cache(settings().kernel_choices_file)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.prepare()  # the kernel's own layout (w8a8 layers prepare on first use or when the lean forward fuses them;
            # w4a8's are repacked if the lean forward fuses them)
    # float parameters (embeddings, norms) in bf16: half the memory, and activations then stay bf16 between the
    # weight-only integer kernels (no per-layer dtype conversions); buffers such as rotary frequencies stay float32.
    # w8a8 and w4a8 quantize their activations from float32 themselves: there everything stays float32 (no conversions)
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if info["scheme"] in INT8_ACTIVATIONS else COMPUTE)
    return model.eval()


def load_lowrank(folder: Path) -> nn.Module:
    """Rebuild the architecture from config.json with LowRankLinear shells where the ranks say, load the weights."""
    config = model_config(folder)
    ranks = getattr(config, LOWRANK_KEY)["ranks"]
    model = empty_skeleton(config, torch.float32)
    for name, r in ranks.items():
        lin = model.get_submodule(name)
        set_module(model, name, LowRankLinear(lin.in_features, lin.out_features, r, lin.bias is not None))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state |= load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise SlmkitError(f"the low-rank weights in {folder} do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}",
                          "Make the model again with slmkit lowrank.")
    if tied:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise SlmkitError(f"the low-rank file in {folder} lacks {leftover[:3]}", "Make the model again with slmkit lowrank.")
    return model.eval()
