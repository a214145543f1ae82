"""`slmkit quantize`: weight-only int8/int4 quantization that runs in the PyTorch backend with integer weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.card import human_bytes
from slmkit.cli.common import JsonOpt, ModelOpt, handle_errors, model_or_default, print_json
from slmkit.compress.quantize import DEFAULT_GROUP, DEFAULT_METHOD


@handle_errors
def quantize(
    model: ModelOpt = None,
    scheme: Annotated[str, typer.Option("--scheme", help="int8 (per channel), int4 (per group), or w8a8 (int8 weights and activations: the integer units).")] = "int8",
    group_size: Annotated[int | None, typer.Option("--group-size", help=f"int4 group size: 32, 64 or 128. [default: {DEFAULT_GROUP}]")] = None,
    method: Annotated[str, typer.Option("--method", help="rtn (round to nearest), gptq or awq (these need --calib), smoothquant (w8a8; --calib optional).")] = DEFAULT_METHOD,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration text file for gptq/awq/smoothquant.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the new model (default MODEL-SCHEME[-gG]-METHOD).")] = None,
    ppl: Annotated[bool, typer.Option("--ppl/--no-ppl", help="Quick perplexity delta on a WikiText-2 sample.")] = True,
    portable: Annotated[bool, typer.Option("--portable", help="Only forms compressed-tensors holds, so transformers and vLLM read the child (int4: integer zero points even where free minimums fit far better, as on a model from a Q4_1 GGUF; AWQ refused).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a model to int8, int4 or w8a8 (real integer weights: smaller and faster), as a new store model in
    compressed-tensors' format (transformers and vLLM read it), except AWQ and int4 with free minimums (chosen where
    they fit far better, as on the default model), which only slmkit reads: says so when it happens; --portable
    keeps to the standard forms."""
    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.evaluate.quick import describe_delta, quick_perplexity
    from slmkit.loading import load
    from slmkit.store import Store


    model = model_or_default(model)
    card = quantize_stage(model, scheme, method=method, group_size=group_size, calib=calib, name=name, portable=portable)
    if as_json:
        print_json(card)
        return
    before = Store().card(model).weights_bytes.get("safetensors") or Store().card(model).size_bytes
    after = card.weights_bytes.get("safetensors") or card.size_bytes
    typer.echo(f"made {card.name}: {human_bytes(after)} (was {human_bytes(before)}: {before / after:.2f}x smaller)")
    if card.settings["format"].startswith("slmkit's own"):
        typer.echo(f"note: saved in {card.settings['format']}")
    if ppl:
        typer.echo(describe_delta(quick_perplexity(load(model)), quick_perplexity(load(card.name))))
