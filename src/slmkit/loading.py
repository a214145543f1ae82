"""The one place engines are registered and opened: `slmkit.load` (CLI, Python API), the server's registry and
the scheduler all get their backends here. Adding a backend is one entry in BACKENDS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from slmkit import progress
from slmkit.card import CARD_JSON, read_card, read_config
from slmkit.config import DEFAULT_MODEL, settings
from slmkit.engine import llamacpp_guard
from slmkit.engine.families import MULTI_LORA_TYPES
from slmkit.engine.backend import Backend
from slmkit.engine.mixture import MixtureBackend
from slmkit.engine.ngram_backend import NgramBackend
from slmkit.engine.torch_backend import TorchBackend
from slmkit.errors import SlmkitError
from slmkit.model import Model
from slmkit.sources import integrity
from slmkit.sources.adapters import base_of, lora_factors, per_row_problem
from slmkit.sources.forms import has_gguf, is_adapter, is_mixture, is_ngram, is_router, read_mixture
from slmkit.sources.importer import ensure_default
from slmkit.store import Store

TOKENIZER_CONTEXT = 64  # llama.cpp under the server: the backend's own context only tokenizes (batches have their own)


def _torch(folder: Path, threads: int, serving: bool) -> Backend:
    return TorchBackend.from_folder(folder, threads=threads)


def _llamacpp(folder: Path, threads: int, serving: bool) -> Backend:
    from slmkit.engine.llamacpp_backend import LlamaCppBackend  # llama_cpp is imported only when asked for

    return LlamaCppBackend.from_folder(folder, threads=threads, n_ctx=TOKENIZER_CONTEXT if serving else 0)


# name -> opener(store folder, threads, serving)
BACKENDS: dict[str, Callable[[Path, int, bool], Backend]] = {"torch": _torch, "llamacpp": _llamacpp}
CHOICES = ("auto", *BACKENDS)


def _not_a_router(folder: Path) -> None:
    if is_router(folder):
        raise SlmkitError(f"{folder.name} is a router (a small and a large model with a policy), not a model to load",
                          f"Serve it: slmkit serve {folder.name}; or run its models by their own names (slmkit route show {folder.name}).")


def pick_backend(folder: Path, backend: str) -> str:
    """The engine a model runs on: `backend`, or for `auto` llama.cpp when the folder has a GGUF (at batch 1 it
    decodes several times faster than PyTorch on a CPU) and the installed llama.cpp runs on this CPU (the guard's
    verdict: else PyTorch, with a warning saying how to rebuild it), else PyTorch. llama.cpp without a GGUF is
    refused here, with how to make one."""
    if backend not in CHOICES:
        raise SlmkitError(f"unknown backend {backend!r}", f"Available backends: {', '.join(CHOICES)}")
    _not_a_router(folder)
    if backend == "auto":
        if is_mixture(folder) or is_ngram(folder) or not has_gguf(folder):  # a mixture scores every position of a prompt
            return "torch"
        verdict = llamacpp_guard.check()
        if not verdict.ok:
            progress.warn(f"llama.cpp does not run on this CPU ({verdict.detail}); using the PyTorch engine. "
                          + llamacpp_guard.rebuild_hint())
            return "torch"
        return "llamacpp"
    if backend == "llamacpp":
        from slmkit.engine.llamacpp_backend import gguf_of

        for f in [folder.parent / n for n in read_mixture(folder)["specialists"]] if is_mixture(folder) else [folder]:
            gguf_of(f)
    return backend


def open_backend(folder: Path, backend: str, *, serving: bool = False, adapters: Sequence[Path] = ()) -> Backend:
    """Open the store folder on `backend` (already picked: torch or llamacpp) with the configured threads, once its
    files are checked whole (a truncated file is named, never a reader's traceback). `adapters`: LoRA adapters of
    this base loaded beside it as ids 1..n, so that requests for each share one batch (PyTorch's lean forward;
    serve/registry.py decides which can)."""
    integrity.require_whole(folder, read_card(folder))
    if is_mixture(folder):  # its specialists, each opened as a model of its own (the store folders beside it)
        m = read_mixture(folder)
        gone = [n for n in m["specialists"] if not (folder.parent / n / CARD_JSON).is_file()]
        if gone:
            raise SlmkitError(f"mixture {folder.name} needs {', '.join(gone)}, which the store no longer has",
                              f"Make or import {', '.join(gone)} again, or remove the mixture (slmkit models rm {folder.name}).")
        folders = [folder.parent / n for n in m["specialists"]]
        base = _shared_base(folders) if backend == "torch" else None
        if base is not None:  # LoRA adapters of one base: rows of one batch over it
            shared = open_backend(base, "torch", serving=serving, adapters=folders)
            return MixtureBackend([], m["prior"], m["share"], names=m["specialists"], shared=shared)
        return MixtureBackend([open_backend(f, backend, serving=serving) for f in folders], m["prior"], m["share"],
                              names=m["specialists"])
    if is_ngram(folder):  # table lookups on slmkit's own engine
        if backend == "llamacpp":
            raise SlmkitError(f"{folder.name} is an n-gram model: it runs on slmkit's own engine, not llama.cpp",
                              "Leave out --backend (or give --backend torch).")
        return NgramBackend.from_folder(folder)
    opened = BACKENDS[backend](folder, settings().threads, serving)
    if adapters:
        if backend != "torch" or opened.fast is None:
            raise SlmkitError(f"{folder.name}: adapters share a base only on PyTorch's lean forward (Llama layout)",
                              "Serve each adapter on its own (it is merged into its base).")
        for a in adapters:
            integrity.require_whole(a, read_card(a))
            opened.fast.add_adapter(lora_factors(a, opened.fast.layers, opened.fast.dtype, opened.fast.block.family.lora_groups))
    return opened


def _shared_base(folders: list[Path]) -> Path | None:
    """The store folder of the base every one of `folders` is a plain LoRA adapter of, where its family runs
    adapters per row on the lean forward; else None."""
    if not all(is_adapter(f) and per_row_problem(f) is None for f in folders):
        return None
    bases = {base_of(f)[1] for f in folders}
    if len(bases) != 1:
        return None
    base = bases.pop()
    return base if read_config(base).get("model_type") in MULTI_LORA_TYPES else None


def load(name: str | None = None, *, backend: str = "torch", store: Store | None = None) -> Model:
    """Load model `name` from the store (the embedded default when None) on the given backend (or auto)."""
    store = store or Store()
    if backend not in CHOICES:
        raise SlmkitError(f"unknown backend {backend!r}", f"Available backends: {', '.join(CHOICES)}")
    name = ensure_default(store) if name in (None, DEFAULT_MODEL) else name  # imported on first use, named or not
    folder = store.require(name)
    _not_a_router(folder)
    card = store.card(name)
    picked = pick_backend(folder, backend) if backend == "auto" else backend
    with progress.step(f"Loading {name} ({picked})"):
        engine = open_backend(folder, picked)
    return Model(name, engine, card)
