"""`slmkit pull SOURCE` and `slmkit models create`: a model from where people keep it, into the store (atomically, its
source in the card), and a model made from another with a preset (system prompt, sampling defaults), as Ollama's
`pull` and `create` do.

SOURCE is, in this order:
- a local .gguf file or Hugging Face folder (as `slmkit models import`);
- a Hugging Face repo, `hf.co/ORG/REPO[:QUANT]` (sources/hf_hub.py);
- a name in Ollama's registry, `[HOST/][NAMESPACE/]NAME[:TAG]` (sources/ollama_registry.py): its GGUF blob,
  resumable and checked against its digest, with the system prompt, parameters and license of its manifest kept as
  the model's preset (its Go chat template is not: slmkit formats chats with the GGUF's own template).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmkit.card import ModelCard
from slmkit.config import settings
from slmkit.errors import ImportFailed, SlmkitError
from slmkit.sources import hf_hub, modelfile, ollama_registry
from slmkit.sources.forms import is_router
from slmkit.sources.importer import import_gguf, import_hf_dir, import_path
from slmkit.store import NAME_RE, Store, name_from_path, validate_name

Report = Callable[[dict[str, Any]], None]  # progress lines in Ollama's shape: {"status", "digest", "total", "completed"}


def downloads_dir() -> Path:
    """Where unfinished downloads wait to be resumed (SLMKIT_HOME/downloads)."""
    return settings().home / "downloads"


def store_name(source: str) -> str:
    """The store name a pulled SOURCE gets by default: the file's or folder's name, else ref_name(SOURCE)."""
    local = Path(source).expanduser()
    return name_from_path(local) if local.exists() else ref_name(source)


def ref_name(ref: str) -> str:
    """The store name of an Ollama or Hugging Face reference: NAME (Ollama's :latest dropped) or NAME-TAG, the repo's
    name (with -QUANT); lower case, in the store's alphabet. Pure: a server maps a client's NAME:TAG with it."""
    if hf_hub.is_hf(ref):
        h = hf_hub.parse_ref(ref)
        raw = h.repo.split("/")[-1] + (f"-{h.quant}" if h.quant else "")
    else:
        o = ollama_registry.parse_ref(ref)
        raw = o.name + ("" if o.tag == "latest" else f"-{o.tag}")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._").lower()[:100] or "model"


def pull(source: str, name: str | None = None, *, store: Store | None = None, overwrite: bool = False,
         report: Report = lambda _: None, local: bool = True) -> ModelCard:
    """Fetch SOURCE (see the module's note) and install it as `name` (default: store_name(SOURCE)). `local` False
    (a server's pull) reads registries only, never a path on this machine."""
    store = store or Store()
    name = validate_name(name) if name is not None else store_name(source) if local else ref_name(source)
    store.check_free(name, overwrite=overwrite)
    path = Path(source).expanduser()
    if local and path.exists():
        report({"status": f"importing {path}"})
        card = import_path(path, name, store=store, overwrite=overwrite)
    elif hf_hub.is_hf(source):
        ref = hf_hub.parse_ref(source)
        path, src = hf_hub.fetch(ref, report)
        report({"status": f"importing {name}"})
        card = (import_gguf(path, name, store=store, overwrite=overwrite, source=src) if path.is_file()
                else import_hf_dir(path, name, store=store, overwrite=overwrite, source=src))
    else:
        card = _pull_ollama(ollama_registry.parse_ref(source), name, store, overwrite, report)
    report({"status": "success"})
    return card


def _pull_ollama(ref: ollama_registry.OllamaRef, name: str, store: Store, overwrite: bool, report: Report) -> ModelCard:
    report({"status": "pulling manifest"})
    manifest = ollama_registry.fetch_manifest(ref)
    weights = ollama_registry.layer(manifest, "model")
    if weights is None:
        raise ImportFailed(f"{ref} has no model layer (GGUF weights) in its manifest", "Pick a model (not an adapter or a projector).")
    for extra in ("adapter", "projector"):
        if ollama_registry.layer(manifest, extra) is not None:
            raise ImportFailed(f"{ref} needs a {extra} layer beside its weights, which slmkit does not run",
                               "Pick a text-only model without an adapter.")
    folder = downloads_dir()
    kept = ollama_registry.read_layers(ref, manifest, folder, report)
    blob = ollama_registry.fetch_blob(ref, weights, folder, report)
    report({"status": f"importing {name}"})
    params = dict(kept.get("params") or {})
    preset = modelfile.preset(system=kept.get("system"), license=kept.get("license"),
                              parameters={k: v for k, v in params.items() if k in modelfile.OPTIONS})
    source = {"kind": "ollama", "registry": ref.host, "model": str(ref), "digest": weights["digest"]}
    card = import_gguf(blob, name, store=store, overwrite=overwrite, source=source,
                       settings={modelfile.PRESET_KEY: preset} if preset else None)
    for entry in manifest["layers"]:  # the store holds its own copy now; unfinished downloads of others stay
        (folder / f"sha256-{entry['digest'].partition(':')[2]}").unlink(missing_ok=True)
    return card


def _link_files(src: Path, dst: Path) -> None:
    """Every model file of `src` into `dst` (hard links; copies across file systems), not its card."""
    from slmkit.card import CARD_JSON, CARD_MD

    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in (CARD_JSON, CARD_MD):
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copyfile(p, dst / p.name)


def derive_copy(src: str, dst: str, *, store: Store | None = None, preset: dict[str, Any] | None = None,
                overwrite: bool = False) -> ModelCard:
    """Model `dst` with `src`'s files (hard links, so no extra disk) and settings, and `preset` where given (it
    replaces the parent's): Ollama's copy, and create FROM a store model."""
    store = store or Store()
    folder = store.require(src)
    card = store.card(src)
    if is_router(folder) or card.settings.get("adapter"):
        raise SlmkitError(f"{src} is a {'router' if is_router(folder) else 'LoRA adapter'}: it cannot be copied",
                          "Copy its models instead" + ("" if is_router(folder) else f", or merge it first: slmkit merge {src}") + ".")
    settings_ = dict(card.settings)
    if preset is not None:
        settings_[modelfile.PRESET_KEY] = preset
    return store.derive(dst, lambda staging: _link_files(folder, staging), stage="copy" if preset is None else "create",
                        parent=src, settings=settings_, parameters=card.parameters, overwrite=overwrite)


def create(name: str, spec: dict[str, Any], *, store: Store | None = None, overwrite: bool = False) -> ModelCard:
    """A model from a Modelfile (modelfile.parse's dict) or an /api/create request's fields: FROM a store model, a
    .gguf file or a Hugging Face folder, with its SYSTEM, PARAMETERs and MESSAGEs as the new model's preset."""
    store = store or Store()
    validate_name(name)
    preset = modelfile.preset(system=spec.get("system"), parameters=spec.get("parameters"), messages=spec.get("messages"),
                              license=spec.get("license"), template=spec.get("template"), adapters=spec.get("adapter"))
    base = str(spec.get("from") or "")
    store.check_free(name, overwrite=overwrite)
    path = Path(base).expanduser()
    if base and not (NAME_RE.match(base) and store.exists(base)) and path.exists():  # a file or folder: imported with the preset
        kw = {"store": store, "overwrite": overwrite, "settings": {modelfile.PRESET_KEY: preset} if preset else None}
        return import_hf_dir(path, name, **kw) if path.is_dir() else import_gguf(path, name, **kw)
    if not base:
        raise SlmkitError("nothing to create the model from", "Name a store model, a .gguf file or a folder (FROM / from).")
    return derive_copy(base, name, store=store, preset=preset, overwrite=overwrite)
