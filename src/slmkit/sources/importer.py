"""Import a model into the store from a GGUF file or a Hugging Face folder; make sure the default is there."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from slmkit import faults, progress
from slmkit.card import ModelCard, sha256_file
from slmkit.config import DEFAULT_MODEL
from slmkit.errors import ImportFailed
from slmkit.sources.gguf import check_gguf, load_gguf
from slmkit.sources.hf_dir import check_hf_dir, load_float
from slmkit.sources.packaged import PACKAGE, default_gguf
from slmkit.store import Store, name_from_path, validate_name


GGUF_FILE = "model.gguf"


def _save(
    store: Store, name: str, model: Any, tokenizer: Any, *, overwrite: bool, gguf: Path | None = None, **lineage: Any
) -> ModelCard:
    """Write safetensors (for the torch backend) and, when the source was GGUF, keep it for llama.cpp."""

    def write(staging: Path) -> None:
        with progress.step(f"Writing {name} (safetensors)"):
            model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
        if gguf is not None:
            with progress.step("Keeping the GGUF file for the llama.cpp backend"):
                shutil.copyfile(gguf, staging / GGUF_FILE)

    return store.derive(name, write, overwrite=overwrite, **lineage)


def import_gguf(path: Path, name: str, *, store: Store, overwrite: bool = False, source: dict | None = None,
                settings: dict | None = None) -> ModelCard:
    meta = check_gguf(path)
    model, tokenizer = load_gguf(path, meta["pre_tokenizer"])
    with progress.step("Hashing the source file"):
        src = {"kind": "gguf", "path": str(path.resolve()), "sha256": sha256_file(path)}
    src.update(source or {})
    facts = {"source_quantization": meta["file_type"], "dtype": "float32", "gguf_architecture": meta["architecture"],
             "pre_tokenizer": meta["pre_tokenizer"], "general": meta["general"]}
    return _save(store, name, model, tokenizer, overwrite=overwrite, gguf=path, stage="import", source=src,
                 settings={**facts, **(settings or {})})


def import_hf_dir(path: Path, name: str, *, store: Store, overwrite: bool = False, source: dict | None = None,
                  settings: dict | None = None) -> ModelCard:
    check_hf_dir(path)
    model, tokenizer = load_float(path, what=f"Loading {path.name}")
    src = {"kind": "hf_dir", "path": str(path.resolve()), **(source or {})}
    return _save(store, name, model, tokenizer, overwrite=overwrite, stage="import", source=src, settings=settings)


def import_path(path: str | Path, name: str | None = None, *, store: Store | None = None, overwrite: bool = False) -> ModelCard:
    """Import a .gguf file or a Hugging Face folder as `name` (default: derived from the path)."""
    store = store or Store()
    faults.point("loading")
    path = Path(path).expanduser()
    name = validate_name(name) if name is not None else name_from_path(path)
    if not path.exists():
        raise ImportFailed(f"{path} does not exist", "Give the path of a .gguf file or of a Hugging Face model folder.")
    store.check_free(name, overwrite=overwrite)
    if path.is_dir():
        return import_hf_dir(path, name, store=store, overwrite=overwrite)
    return import_gguf(path, name, store=store, overwrite=overwrite)


def ensure_default(store: Store | None = None) -> str:
    """Import the packaged default model on first use; afterwards this is a folder check."""
    store = store or Store()
    present = store.exists(DEFAULT_MODEL)
    # stores made by slmkit 0.1.0 before the GGUF was kept need it for the llama.cpp backend: re-import (atomic)
    stale = present and not (store.path(DEFAULT_MODEL) / GGUF_FILE).is_file() and store.card(DEFAULT_MODEL).source.get("kind") == "packaged"
    if not present or stale:
        path, version = default_gguf()
        why = "First use" if not present else "Updating the store copy (adding its GGUF for llama.cpp)"
        progress.note(f"{why}: importing the default model {DEFAULT_MODEL} from {PACKAGE} {version} (once).")
        import_gguf(path, DEFAULT_MODEL, store=store, overwrite=stale,
                    source={"kind": "packaged", "package": PACKAGE, "package_version": version})
    return DEFAULT_MODEL
