"""One table of loaders: a store folder's weights and tokenizer as a transformers model, by the form it holds
(sources/forms.py). The PyTorch engine opens every model through `load`; a new form is one entry in LOADERS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmkit.errors import SlmkitError
from slmkit.sources import forms
from slmkit.sources.adapters import load_merged, load_prompt_tuned
from slmkit.sources.gguf import check_gguf, load_gguf
from slmkit.sources.hf_dir import load_float, load_tokenizer


def _gguf_only(folder: Path) -> tuple[Any, Any]:  # an export installed back into the store
    path = sorted(folder.glob("*.gguf"))[0]
    return load_gguf(path, check_gguf(path)["pre_tokenizer"])


def _router(folder: Path) -> tuple[Any, Any]:
    raise SlmkitError(f"{folder.name} is a router, not model weights", f"Serve it: slmkit serve {folder.name}.")


# form -> loader(folder) -> (model, tokenizer)
LOADERS: dict[str, Callable[[Path], tuple[Any, Any]]] = {
    "integer": lambda f: (forms.load_quantized(f), load_tokenizer(f)),  # `slmkit quantize`'s integer weights
    "prompt-tuned": load_prompt_tuned,  # a learned prefix over its base (virtual tokens before every prompt)
    "adapter": load_merged,  # a LoRA adapter from `slmkit finetune`: merged into its base at load
    "low-rank": lambda f: (forms.load_lowrank(f), load_tokenizer(f)),  # `slmkit lowrank`'s factorized layers
    "gguf": _gguf_only,
    "float": load_float,
    "router": _router,
}


def load(folder: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a store folder, whatever form it holds (no pickle, no remote code)."""
    folder = Path(folder)
    return LOADERS[forms.form_of(folder)](folder)
