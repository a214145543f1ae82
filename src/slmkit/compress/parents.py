"""Which stored forms a stage can start from: plain float weights (not integer, not factorized, not GGUF-only)."""

from __future__ import annotations

from pathlib import Path

from slmkit.card import ModelCard
from slmkit.sources.forms import form_of
from slmkit.errors import SlmkitError
from slmkit.store import Store


def float_parent(store: Store, model: str) -> tuple[Path, ModelCard]:
    """The store folder and card of `model` when it holds plain float weights; else a clear error."""
    folder = store.require(model)
    card = store.card(model)
    form = form_of(folder)
    if form in ("adapter", "prompt-tuned"):
        raise SlmkitError(f"{model} is an adapter, not a whole model",
                          f"Merge it into its base first (slmkit merge {model}; LoRA adapters), then use the merged model.")
    if form != "float" or card.stage == "export":
        raise SlmkitError(f"{model} holds no plain float weights to change ({card.stage})",
                          f"Start from its float parent ({card.parent or 'the model it came from'}), then quantize or export the child.")
    return folder, card
