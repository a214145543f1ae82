"""What a GGUF says about the model in it (`general.*`, as llama.cpp's converter writes them), from the store's
lineage: the facts of the model it all started from (name, organization, license, languages: read from its GGUF at
import), this model's own size and name, the stages that made it, and its base model."""

from __future__ import annotations

from typing import Any

from slmkit.store import Store

UNKNOWN_LICENSE = "other"


def size_label(parameters: int) -> str:
    """llama.cpp's size label: 135M, 1.7B."""
    if parameters >= 1e9:
        return f"{parameters / 1e9:.1f}B".replace(".0B", "B")
    return f"{round(parameters / 1e6)}M" if parameters >= 1e6 else f"{round(parameters / 1e3)}K"


def lineage(store: Store, model: str) -> list[Any]:
    """The model's card, its parent's, ... up to the first (parents missing from the store end the chain)."""
    chain, name, seen = [], model, set()
    while name and name not in seen and store.exists(name):
        seen.add(name)
        card = store.card(name)
        chain.append(card)
        name = card.parent
    return chain


def gguf_metadata(store: Store, model: str, gguf_type: str, imatrix: dict[str, Any] | None = None) -> dict[str, Any]:
    chain = lineage(store, model)
    me, root = chain[0], chain[-1]
    general = next((c.settings.get("general") for c in chain if (c.settings or {}).get("general")), None) or {}
    stages = [c.stage for c in reversed(chain[:-1]) if c.stage not in ("import", "export")]
    meta: dict[str, Any] = {
        "name": me.name,
        "basename": general.get("basename") or root.name,
        "size_label": size_label(me.parameters) if me.parameters else general.get("size_label"),
        "license": general.get("license") or UNKNOWN_LICENSE,
        "license_known": bool(general.get("license")),
        "organization": general.get("organization"),
        "languages": general.get("languages"),
        "tags": sorted({*(general.get("tags") or []), "slmkit", *stages}),
        "finetune": "-".join(stages) if stages else general.get("finetune"),
        "description": " -> ".join([root.name, *(f"{c.stage} ({c.name})" for c in reversed(chain[:-1]))]) if stages else None,
        "quantized_by": "slmkit" if gguf_type not in ("F32", "F16") else None,
        "imatrix": (imatrix or {}).get("source"),
    }
    if len(chain) > 1 or general:
        base = chain[1] if len(chain) > 1 else root
        meta["base_model"] = {"name": general.get("name") if base is root and general.get("name") else base.name,
                              "organization": general.get("organization") if base is root else None}
    return meta


def write_metadata(w: Any, meta: dict[str, Any]) -> None:
    """Add the fields to a gguf.GGUFWriter (the name is written by the caller)."""
    for key, adder in (("basename", w.add_basename), ("size_label", w.add_size_label), ("license", w.add_license),
                       ("organization", w.add_organization), ("finetune", w.add_finetune), ("description", w.add_description),
                       ("quantized_by", w.add_quantized_by)):
        if meta.get(key):
            adder(str(meta[key]))
    if meta.get("languages"):
        w.add_languages(list(meta["languages"]))
    if meta.get("tags"):
        w.add_tags(list(meta["tags"]))
    base = meta.get("base_model")
    if base:
        w.add_base_model_count(1)
        w.add_base_model_name(0, str(base["name"]))
        if base.get("organization"):
            w.add_base_model_organization(0, str(base["organization"]))
    if meta.get("imatrix"):
        w.add_string("quantize.imatrix.dataset", str(meta["imatrix"]))
