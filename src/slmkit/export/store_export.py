"""`export_model`: a store model -> GGUF file + Modelfile, optionally installed back into the store."""

from __future__ import annotations

import json

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.config import settings
from slmkit.export.auto_type import check_budget, choose_type
from slmkit.export.gguf import check_exportable, check_type, export_gguf
from slmkit.gguf_tables import AUTO_TYPE, DEFAULT_PPL_BUDGET
from slmkit.sources.forms import VOCAB_MAP, is_adapter, is_lowrank, is_quantized, load_lowrank
from slmkit.errors import SlmkitError
from slmkit.export.imatrix import Imatrix, load_or_compute, write_imatrix_gguf
from slmkit.export.metadata import gguf_metadata
from slmkit.layers.walk import count_params
from slmkit.card import read_config
from slmkit.store import Store, validate_name

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json")


def export_model(
    model: str, gguf_type: str, *, out_dir: Path | None = None, store_as: str | None = None, store: Store | None = None,
    imatrix: Path | None = None, lora_adapter: bool = False, ppl_budget: float = DEFAULT_PPL_BUDGET,
) -> dict[str, Any]:
    """Write MODEL as GGUF of `gguf_type`; with `store_as`, also install it as a new store model (stage export).

    `lora_adapter` (MODEL a LoRA adapter): keep the adapter apart instead of merging it: its base as GGUF of
    `gguf_type`, the adapter as a GGUF LoRA file beside it, and the Modelfile's ADAPTER line naming it.

    `imatrix`: calibration text (an importance matrix is computed from it and saved beside the GGUF as
    imatrix.gguf) or an imatrix GGUF; llama.cpp's quantizer then weighs rounding error by activation size."""
    store = store or Store()
    store.sweep_exports()  # what a killed export left behind
    auto = gguf_type.upper() == AUTO_TYPE
    if auto and (imatrix is not None or lora_adapter):
        raise SlmkitError("--type auto does not combine with --imatrix or --lora-adapter yet",
                          "Run --type auto first, then export the type it chose with --imatrix / --lora-adapter.")
    gguf_type = AUTO_TYPE if auto else check_type(gguf_type)
    folder = store.require(model)
    if lora_adapter:
        return _export_with_adapter(store, model, folder, gguf_type, out_dir, imatrix)
    check_exportable(read_config(folder))
    gguf_only, quantized = not list(folder.glob("*.safetensors")), is_quantized(folder)
    if gguf_only or quantized:
        parent = store.card(model).parent
        what = "holds only a GGUF file" if gguf_only else "holds PyTorch integer weights (slmkit quantize)"
        raise SlmkitError(
            f"{model} {what}: there are no float weights to export",
            f"Export its float parent instead: slmkit export {parent or 'PARENT'} --type {gguf_type}"
            + ("" if parent else "; or run the GGUF as it is with --backend llamacpp."),
        )
    if imatrix is not None and gguf_type in ("F32", "F16"):
        raise SlmkitError(f"--imatrix guides quantization; {gguf_type} is not quantized",
                          "Drop --imatrix, or pick a quantized --type such as Q4_K_M.")
    if store_as is not None:  # checked before the slow work (--type auto's trials take minutes)
        validate_name(store_as)
        store.check_free(store_as)
    if auto:
        check_budget(ppl_budget)
    tokenizer_gguf = tokenizer_source(store, model)
    with _dense_source(folder) as (source, note):
        trials = None
        if auto:  # measured on this model: each type's size and perplexity in llama.cpp
            gguf_type, trials = choose_type(source, ppl_budget, settings().home / "exports", threads=settings().threads,
                                            tokenizer_gguf=tokenizer_gguf)
        base = f"{model}-{gguf_type.lower()}" + ("-imat" if imatrix is not None else "")
        out_dir = out_dir or settings().home / "exports" / base
        imat, imat_info = None, None
        if imatrix is not None:
            imat, imat_info = _importance(imatrix, source, out_dir)
        meta = gguf_metadata(store, model, gguf_type, imat_info)
        notes = [note] if note else []
        path = export_gguf(source, out_dir, name=base, gguf_type=gguf_type, threads=settings().threads,
                           imatrix=imat.means() if imat else None, meta=meta, notes=notes,
                           tokenizer_gguf=tokenizer_gguf)
        if not meta["license_known"]:
            notes.append(f"the license is unknown (no source in its lineage says): written as {meta['license']!r}")
        note = "; ".join(notes) or None
        parent_card = store.card(model)
        result: dict[str, Any] = {
            "model": model, "type": gguf_type, "gguf": str(path), "modelfile": str(out_dir / "Modelfile"),
            "size_before": parent_card.weights_bytes.get("safetensors") or parent_card.size_bytes,
            "size_after": path.stat().st_size, "store_name": None, "imatrix": imat_info, "note": note,
            "auto": {"ppl_budget": ppl_budget, "tried": trials} if trials else None,
        }
        if store_as is not None:
            _install_export(store, store_as, model, path, source, gguf_type, imat_info)
            result["store_name"] = store_as
    return result


def tokenizer_source(store: Store, model: str) -> tuple[Path, list[int] | None] | None:
    """The GGUF file `model`'s tokenizer came from: the nearest model in its lineage that was imported from a GGUF
    (and keeps it) with the same tokenizer.json, through vocabulary trims on the way (then with the ids of that
    file's vocabulary that `model` kept, new id = position); None if there is none."""
    own = store.path(model) / "tokenizer.json"
    if not own.is_file():
        return None
    want, keep = own.read_bytes(), None
    name: str | None = model
    seen = set()
    while name and name not in seen and store.exists(name):
        seen.add(name)
        folder = store.path(name)
        if (folder / "model.gguf").is_file() and (folder / "tokenizer.json").is_file() and (folder / "tokenizer.json").read_bytes() == want:
            return folder / "model.gguf", keep
        parent = store.card(name).parent
        if (folder / VOCAB_MAP).is_file() and parent and store.exists(parent):  # a trim: go on in its parent's ids
            kept = json.loads((folder / VOCAB_MAP).read_text())["kept"]
            keep = kept if keep is None else [kept[i] for i in keep]
            parent_tokenizer = store.path(parent) / "tokenizer.json"
            if not parent_tokenizer.is_file():
                return None
            want = parent_tokenizer.read_bytes()
        name = parent
    return None


def _export_with_adapter(store: Store, model: str, folder: Path, gguf_type: str, out_dir: Path | None,
                         imatrix: Path | None) -> dict[str, Any]:
    from slmkit.export.lora_gguf import write_lora_gguf
    from slmkit.sources.adapters import base_of

    if not is_adapter(folder):
        raise SlmkitError(f"{model} is not a LoRA adapter: there is no adapter to keep apart",
                          "Drop --lora-adapter (or give an adapter made by slmkit finetune --method lora).")
    base, _ = base_of(folder)
    out_dir = out_dir or settings().home / "exports" / f"{model}-{gguf_type.lower()}"
    result = export_model(base, gguf_type, out_dir=out_dir, store=store, imatrix=imatrix)
    final = out_dir / f"{model}-lora.gguf"
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    try:
        with progress.step("Writing the LoRA adapter as GGUF"):
            n = write_lora_gguf(folder, tmp, name=model)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    modelfile = Path(result["modelfile"])
    lines = modelfile.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("FROM ")) + 1
    tmp_mf = out_dir / f".Modelfile.tmp-{os.getpid()}"
    tmp_mf.write_text("\n".join([*lines[:at], f"ADAPTER ./{final.name}", *lines[at:]]) + "\n")
    os.replace(tmp_mf, modelfile)
    result.update(model=model, adapter_gguf=str(final), adapted_weights=n,
                  note=f"the adapter is kept apart: {Path(result['gguf']).name} is its base ({base}); llama.cpp applies "
                       f"{final.name} at load (--lora), Ollama through the Modelfile's ADAPTER line")
    return result


@contextmanager
def _dense_source(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """The folder to convert: the model's own, or for a low-rank model (GGUF has no factorized layers) a temporary
    copy with the factors multiplied back, and a note saying what that costs."""
    import torch

    from slmkit.compress.lowrank import densify
    from slmkit.sources.adapters import base_of, load_merged

    if not is_lowrank(folder) and not is_adapter(folder):
        yield folder, None
        return
    with tempfile.TemporaryDirectory(prefix=".slmkit-dense-", dir=settings().home) as tmp:
        if is_adapter(folder):
            with progress.step("Merging the LoRA adapter into its base"):
                net, _ = load_merged(folder, dtype=torch.float32)
                note = f"the LoRA adapter was merged into its base ({base_of(folder)[0]}): the GGUF is the merged model"
        else:
            with progress.step("Multiplying the low-rank factors back (GGUF has no factorized layers)"):
                net = load_lowrank(folder)
                factored = count_params(net)
                n = densify(net)
                dense = count_params(net)
                note = (f"{n} low-rank layers multiplied back to dense: the GGUF holds {dense:,} parameters (the store model "
                        f"{factored:,}); the quality is the low-rank model's, the size and speed a dense one's")
        net.save_pretrained(tmp, safe_serialization=True)
        for name in COPIED:
            if name != "config.json" and (folder / name).is_file():
                shutil.copyfile(folder / name, Path(tmp) / name)
        yield Path(tmp), note


def _install_export(store: Store, store_as: str, model: str, path: Path, source: Path, gguf_type: str,
                    imat_info: dict[str, Any] | None) -> None:
    """The GGUF as a store model of its own (stage export), with the config and tokenizer files it was made from."""

    def write(staging: Path) -> None:
        with progress.step(f"Installing {store_as} in the store"):
            shutil.copyfile(path, staging / "model.gguf")
            for name in COPIED:
                if (source / name).is_file():
                    shutil.copyfile(source / name, staging / name)

    store.derive(store_as, write, stage="export", parent=model, source={"kind": "export", "parent": model},
                 settings={"format": "gguf", "type": gguf_type, "imatrix": imat_info})


def _importance(spec: Path, folder: Path, out_dir: Path) -> tuple[Imatrix, dict[str, Any]]:
    """Load or compute the importance matrix; a computed one is saved as out_dir/imatrix.gguf (reusable)."""
    import os

    from slmkit.card import sha256_file

    imat, computed = load_or_compute(spec, folder)
    info: dict[str, Any] = {"source": str(spec), "sha256": sha256_file(spec), "computed": computed,
                            "tensors": len(imat.sums), "chunks": imat.chunk_count, "chunk_size": imat.chunk_size}
    if computed:
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "imatrix.gguf"
        tmp = out_dir / f".imatrix.gguf.tmp-{os.getpid()}"
        try:
            write_imatrix_gguf(imat, tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        info["file"] = str(final)
    return imat, info
