"""`slmkit.load`: find a model in the store (importing the default on first use) and bind it to a backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slmkit.config import settings
from slmkit.engine.backend import Backend
from slmkit.engine.torch_backend import TorchBackend
from slmkit.errors import SlmkitError
from slmkit.model import Model
from slmkit.sources.importer import ensure_default
from slmkit.store import Store

def _llamacpp(folder: Path, threads: int) -> Backend:
    from slmkit.engine.llamacpp_backend import LlamaCppBackend  # llama_cpp is imported only when asked for

    return LlamaCppBackend.from_folder(folder, threads=threads)


# name -> loader from a store folder
BACKENDS: dict[str, Callable[[Path, int], Backend]] = {
    "torch": lambda folder, threads: TorchBackend.from_folder(folder, threads=threads),
    "llamacpp": _llamacpp,
}


def load(name: str | None = None, *, backend: str = "torch", store: Store | None = None) -> Model:
    """Load model `name` from the store (the embedded default when None) on the given backend."""
    store = store or Store()
    if backend not in BACKENDS:
        raise SlmkitError(f"unknown backend {backend!r}", f"Available backends: {', '.join(sorted(BACKENDS))}")
    name = name or ensure_default(store)
    folder = store.require(name)
    card = store.card(name)
    from slmkit import progress

    with progress.step(f"Loading {name} ({backend})"):
        engine = BACKENDS[backend](folder, settings().threads)
    return Model(name, engine, card)
