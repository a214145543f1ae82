"""`quantize`: the store stage that takes a model and puts its weight-quantized child back, with lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slmkit import progress
from slmkit.card import ModelCard, build_card, write_card
from slmkit.compress.quantize import METHODS, SCHEMES, is_quantized, quantize_model, save_quantized
from slmkit.errors import SlmkitError
from slmkit.store import Store, validate_name

CALIB_WINDOW = 512
CALIB_SAMPLES = 32


def calibration_batches(
    tokenizer: Any, path: Path, *, window: int = CALIB_WINDOW, samples: int = CALIB_SAMPLES, option: str = "--calib"
) -> list[torch.Tensor]:
    """Consecutive token windows from a text file (the first `samples` of them); `option` names it in errors."""
    if not path.is_file():
        raise SlmkitError(f"calibration file {path} not found", f"Pass {option} with a plain-text file (a few hundred KB is plenty).")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SlmkitError(f"calibration file {path} is empty", f"Pass {option} with a non-empty plain-text file.")
    ids = tokenizer.encode(text[: window * samples * 8], add_special_tokens=False)
    batches = [torch.tensor([ids[i : i + window]]) for i in range(0, len(ids) - 1, window)][:samples]
    return [b for b in batches if b.shape[1] > 1]


def quantize_stage(
    model: str, scheme: str, *, method: str = "rtn", group_size: int | None = None, calib: Path | None = None,
    name: str | None = None, store: Store | None = None,
) -> ModelCard:
    """Quantize store model `model` into a new store model (default name MODEL-SCHEME[-gG][-METHOD])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = store or Store()
    folder = store.require(model)
    parent = store.card(model)
    if scheme not in SCHEMES or method not in METHODS:
        raise SlmkitError(f"unknown scheme/method {scheme!r}/{method!r}", f"Schemes: {', '.join(SCHEMES)}; methods: {', '.join(METHODS)}")
    if is_quantized(folder) or not list(folder.glob("*.safetensors")) or parent.stage == "export":
        raise SlmkitError(
            f"{model} is already quantized ({parent.stage}: {parent.settings.get('scheme') or parent.settings.get('type')})",
            f"Quantizing rounded weights again compounds the error; quantize its float parent instead: {parent.parent or model}.",
        )
    if method in ("gptq", "awq") and calib is None:
        raise SlmkitError(f"--method {method} needs calibration text", "Pass --calib FILE (plain text, e.g. ../shared/data/wikitext2/wiki.valid.tokens).")
    if method == "rtn" and calib is not None:
        raise SlmkitError("--calib is used by gptq and awq only", "Drop --calib, or pick --method gptq or awq.")
    suffix = f"-g{group_size or 32}" if scheme == "int4" else ""
    name = validate_name(name or f"{model}-{scheme}{suffix}-{method}")
    store.check_free(name)
    with progress.step(f"Loading {model}"):
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    window = min(CALIB_WINDOW, net.config.max_position_embeddings or CALIB_WINDOW)
    batches = calibration_batches(tokenizer, calib, window=window) if calib is not None else None
    info = quantize_model(net, scheme, method=method, group_size=group_size, calibration=batches)
    settings = {k: info[k] for k in ("scheme", "method", "group_size", "compute")}
    if calib is not None:
        from slmkit.card import sha256_file

        settings["calibration"] = {"file": str(calib), "sha256": sha256_file(calib), "windows": len(batches or []), "window": window}
    with store.install(name) as staging:
        with progress.step(f"Writing {name}"):
            save_quantized(net, tokenizer, staging)
        card = build_card(staging, name=name, stage="quantize", parent=model, source={"kind": "stage", "parent": model},
                          settings=settings, parameters=parent.parameters)
        write_card(staging, card)
    return card
