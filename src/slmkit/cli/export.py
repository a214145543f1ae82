"""`slmkit export`: write a store model as GGUF with llama.cpp's quant types, plus an Ollama Modelfile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.card import human_bytes
from slmkit.cli.common import JsonOpt, ModelOpt, handle_errors, model_or_default, print_json
from slmkit.errors import SlmkitError
from slmkit.gguf_tables import DEFAULT_PPL_BUDGET, GGUF_TYPES


@handle_errors
def export(
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama) or hf (a plain Hugging Face folder with a README model card).")] = "gguf",
    gguf_type: Annotated[str | None, typer.Option("--type", help=f"GGUF type: {', '.join(GGUF_TYPES)}, or auto (the smallest within --ppl-budget, measured). [default: Q8_0; a model trained onto a type's grid (quantize --method qat): that type]")] = None,
    ppl_budget: Annotated[float, typer.Option("--ppl-budget", help="For --type auto: the perplexity increase over F32 allowed, as a share.")] = DEFAULT_PPL_BUDGET,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: $SLMKIT_HOME/exports/MODEL-TYPE).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Also install the GGUF in the store under this name.")] = None,
    ppl: Annotated[bool, typer.Option("--ppl/--no-ppl", help="Quick perplexity delta on a WikiText-2 sample.")] = True,
    imatrix: Annotated[Path | None, typer.Option(
        "--imatrix", help="Calibration text to compute an importance matrix from (saved as imatrix.gguf), "
                          "or an imatrix .gguf (ours or llama-imatrix's). Improves K-quants and Q4_0.")] = None,
    lora_adapter: Annotated[bool, typer.Option("--lora-adapter", help="For a LoRA adapter: keep it apart (its base as GGUF + a GGUF LoRA "
                                               "file + the Modelfile's ADAPTER line) instead of merging it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export to GGUF (F32, F16, Q8_0, Q6_K, Q5_K_M, Q5_1, Q5_0, Q4_K_M, Q4_1, Q4_0, or auto) and write an Ollama Modelfile beside it."""
    from slmkit.export.store_export import export_model

    if fmt not in ("gguf", "hf"):
        raise SlmkitError(f"unknown export format {fmt!r}", "Formats: gguf, hf (a Hugging Face folder)")

    model = model_or_default(model)
    if fmt == "hf":
        from slmkit.config import settings
        from slmkit.export.hf import export_hf

        res = export_hf(model, out or settings().home / "exports" / f"{model}-hf")
        if as_json:
            print_json(res)
            return
        typer.echo(f"wrote {res['out']}  (huggingface-cli upload REPO {res['out']})")
        for note in (res["note"], None if res["license_known"] else "the license is unknown: README says license 'other'"):
            if note:
                typer.echo(f"note: {note}")
        return
    if lora_adapter and name:
        raise SlmkitError("--name installs one GGUF in the store; an adapter kept apart is two files", "Drop --name, or --lora-adapter.")
    if gguf_type is None:  # a quantization-aware-trained child exports to the type it was trained for
        from slmkit.store import Store

        gguf_type = (Store().card(model).settings.get("qat") or {}).get("type", "Q8_0")
    res = export_model(model, gguf_type, out_dir=out, store_as=name, imatrix=imatrix, lora_adapter=lora_adapter, ppl_budget=ppl_budget)
    if as_json:
        print_json(res)
        return
    if res.get("auto"):
        from slmkit.export.auto_type import describe

        typer.echo(describe(res["auto"]["tried"], res["type"], ppl_budget))
    typer.echo(f"wrote {res['gguf']} ({human_bytes(res['size_after'])}, was {human_bytes(res['size_before'])} "
               f"as safetensors: {res['size_before'] / res['size_after']:.2f}x smaller)")
    typer.echo(f"wrote {res['modelfile']}  (ollama create NAME -f {res['modelfile']})")
    if res.get("adapter_gguf"):
        typer.echo(f"wrote {res['adapter_gguf']}  (LoRA adapter, {res['adapted_weights']} weights: llama-cli -m {Path(res['gguf']).name} --lora {Path(res['adapter_gguf']).name})")
    if res["imatrix"] and res["imatrix"].get("file"):
        typer.echo(f"wrote {res['imatrix']['file']}  (importance matrix of {res['imatrix']['tensors']} weights from "
                   f"{res['imatrix']['chunks']} x {res['imatrix']['chunk_size']} tokens; reuse it with --imatrix)")
    if res["note"]:
        typer.echo(f"note: {res['note']}")
    if res["store_name"]:
        typer.echo(f"installed {res['store_name']} in the store (run it with --backend llamacpp)")
    if ppl and not res.get("adapter_gguf"):
        _quick_ppl_delta(model, Path(res["gguf"]))


def _quick_ppl_delta(model: str, gguf_path: Path) -> None:
    """Perplexity of the source (torch) and the GGUF (llama.cpp) on the same small WikiText-2 sample."""
    from slmkit.config import settings
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.evaluate.quick import describe_delta, quick_perplexity
    from slmkit.loading import load
    from slmkit.model import Model

    before = quick_perplexity(load(model))
    after = quick_perplexity(Model(gguf_path.stem, LlamaCppBackend(gguf_path, threads=settings().threads)))
    typer.echo(describe_delta(before, after))
