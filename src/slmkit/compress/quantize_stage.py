"""`quantize`: the store stage that takes a model and puts its weight-quantized child back, with lineage."""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit import progress
from slmkit.card import ModelCard
from slmkit.compress.calibrate import CALIB_SAMPLES, CALIB_WINDOW, calibration_for
from slmkit.sources.forms import form_of
from slmkit.compress.quantize import DEFAULT_GROUP, DEFAULT_METHOD, check_method, embedding_form, head_scheme, own_layout, quantize_model, save_quantized
from slmkit.errors import SlmkitError
from slmkit.layers.integer import SCHEME_BITS
from slmkit.sources.hf_dir import load_float
from slmkit.store import Store, validate_name


def quantize_stage(
    model: str, scheme: str, *, method: str = DEFAULT_METHOD, group_size: int | None = None, calib: Path | None = None,
    name: str | None = None, store: Store | None = None, portable: bool = False, head: str | None = None,
    embedding: str | None = None,
) -> ModelCard:
    """Quantize store model `model` into a new store model (default name MODEL-SCHEME[-gG][-METHOD]). The child is in
    compressed-tensors' layout (transformers, vLLM) unless a form it cannot hold fits far better (int4 on a model
    dequantized from a Q4_1 GGUF) or was asked for (AWQ); `portable` forbids those forms. The card's settings
    say which ("format"). `head`: the output head's scheme where it is to differ from the scheme's default (w4a8's
    head is w8a8); `embedding`: "head" or "separate" (w4a8's default with an 8-bit head: read from the head where
    the two were tied)."""
    store = store or Store()
    folder = store.require(model)
    parent = store.card(model)
    check_method(scheme, method)
    head_scheme(scheme, head, portable)  # (checked before anything loads)
    embedding_form(scheme, embedding, method, portable, head)
    form = form_of(folder)
    if form == "router":
        raise SlmkitError(f"{model} is a router, not model weights", "Quantize its small and large models by their own names.")
    if form in ("adapter", "prompt-tuned"):
        raise SlmkitError(f"{model} is a LoRA adapter, not a whole model", f"Merge it first (slmkit merge {model}), then quantize the merged model.")
    if form == "low-rank":
        raise SlmkitError(f"{model} holds factorized (low-rank) layers, which slmkit quantize does not handle yet",
                          f"Quantize its float parent ({parent.parent or 'PARENT'}), or export {model} to GGUF (its factors are multiplied back).")
    if form in ("integer", "gguf") or parent.stage == "export":
        raise SlmkitError(
            f"{model} is already quantized ({parent.stage}: {parent.settings.get('scheme') or parent.settings.get('type')})",
            f"Quantizing rounded weights again compounds the error; quantize its float parent instead: {parent.parent or model}.",
        )
    if method in ("gptq", "awq") and calib is None:  # smoothquant falls back to the calibration sample slmkit ships
        raise SlmkitError(f"--method {method} needs calibration text", "Pass --calib FILE: plain text like what the model will see, a few hundred KB.")
    if method == "rtn" and calib is not None:
        raise SlmkitError("--calib is used by gptq and awq only", "Drop --calib, or pick --method gptq or awq.")
    suffix = f"-g{group_size or DEFAULT_GROUP}" if SCHEME_BITS[scheme] == 4 else ""
    suffix += f"-head-{head}" if head is not None and head != head_scheme(scheme, None, portable) else ""
    suffix += f"-embedding-{embedding}" if embedding is not None and embedding != embedding_form(scheme, None, method, portable, head) else ""
    name = validate_name(name or f"{model}-{scheme}{suffix}-{method}")
    store.check_free(name)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    batches, calib_info = None, None
    if method != "rtn":  # gptq/awq need --calib (checked above); smoothquant falls back to the sample slmkit ships
        batches, calib_info = calibration_for(tokenizer, net, calib, CALIB_SAMPLES, CALIB_WINDOW)
    info = quantize_model(net, scheme, method=method, group_size=group_size, calibration=batches, portable=portable, head=head,
                          embedding=embedding)
    settings = {k: info[k] for k in ("scheme", "method", "group_size", "head", "embedding", "zero_point", "smoothquant", "compute") if k in info}
    own = own_layout(info)
    settings["format"] = (f"slmkit's own (other loaders refuse it): {own[1]}; `slmkit quantize --portable` makes a "
                          "compressed-tensors child" if own else "compressed-tensors (transformers, vLLM)")
    if calib_info is not None:
        settings["calibration"] = calib_info
    def write(staging: Path) -> None:
        with progress.step(f"Writing {name}"):
            save_quantized(net, tokenizer, staging)

    return store.derive(name, write, stage="quantize", parent=model, settings=settings, parameters=parent.parameters)
