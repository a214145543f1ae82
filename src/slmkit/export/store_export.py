"""`export_model`: a store model -> GGUF file + Modelfile, optionally installed back into the store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.card import build_card, write_card
from slmkit.config import settings
from slmkit.export.gguf import check_exportable, check_type, export_gguf
from slmkit.store import Store, validate_name

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json")


def export_model(
    model: str, gguf_type: str, *, out_dir: Path | None = None, store_as: str | None = None, store: Store | None = None
) -> dict[str, Any]:
    """Write MODEL as GGUF of `gguf_type`; with `store_as`, also install it as a new store model (stage export)."""
    import json

    store = store or Store()
    gguf_type = check_type(gguf_type)
    folder = store.require(model)
    check_exportable(json.loads((folder / "config.json").read_text()))
    if store_as is not None:
        validate_name(store_as)
        store.check_free(store_as)
    base = f"{model}-{gguf_type.lower()}"
    out_dir = out_dir or settings().home / "exports" / base
    path = export_gguf(folder, out_dir, name=base, gguf_type=gguf_type, threads=settings().threads)
    parent_card = store.card(model)
    result: dict[str, Any] = {
        "model": model, "type": gguf_type, "gguf": str(path), "modelfile": str(out_dir / "Modelfile"),
        "size_before": parent_card.weights_bytes.get("safetensors") or parent_card.size_bytes,
        "size_after": path.stat().st_size, "store_name": None,
    }
    if store_as is not None:
        with store.install(store_as) as staging:
            with progress.step(f"Installing {store_as} in the store"):
                shutil.copyfile(path, staging / "model.gguf")
                for name in COPIED:
                    if (folder / name).is_file():
                        shutil.copyfile(folder / name, staging / name)
                card = build_card(staging, name=store_as, stage="export", parent=model,
                                  source={"kind": "export", "parent": model},
                                  settings={"format": "gguf", "type": gguf_type})
                write_card(staging, card)
        result["store_name"] = store_as
    return result
