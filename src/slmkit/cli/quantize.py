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
    scheme: Annotated[str, typer.Option("--scheme", help="int8 (per channel), int4 (per group), w8a8 (int8 weights and activations: the integer units), w4a8 (int4 weights per group, int8 activations: half w8a8's bytes per token), or gguf:Q4_0 (Q4_1, Q5_0, Q5_1, Q8_0) with --method qat: trained onto llama.cpp's grid.")] = "int8",
    group_size: Annotated[int | None, typer.Option("--group-size", help=f"int4/w4a8 group size: 32, 64 or 128. [default: {DEFAULT_GROUP}]")] = None,
    method: Annotated[str, typer.Option("--method", help="rtn (round to nearest), gptq or awq (these need --calib), smoothquant (w8a8, w4a8; --calib optional), qat (gguf: schemes; needs --data).")] = DEFAULT_METHOD,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration text file for gptq/awq/smoothquant.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the new model (default MODEL-SCHEME[-gG]-METHOD).")] = None,
    ppl: Annotated[bool, typer.Option("--ppl/--no-ppl", help="Quick perplexity delta on a WikiText-2 sample.")] = True,
    data: Annotated[list[Path] | None, typer.Option("--data", help="qat: training text (text, JSON lines or CSV; repeatable).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="qat: optimizer steps (batches of 4 windows of 256 tokens).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="qat: peak learning rate. [default: 2e-5]")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="qat: weight of the KL to the float parent; the rest is the data's next-token loss. [default: 1]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="qat: go on from the run's last checkpoint.")] = False,
    head: Annotated[str | None, typer.Option("--head", help="The output head's scheme where it is to differ, with the same kind of activations: int8 or int4 (weight-only models), w8a8 or w4a8 (a w8a8 model with a 4-bit head: half the head's bytes per token). [default: w8a8 for w4a8 (4-bit heads cost most of its perplexity on the default model), else the scheme]")] = None,
    embedding: Annotated[str | None, typer.Option("--embedding", help="head: read the token embedding from the integer output head it was tied to (no float table: the default model's w4a8 child 153 -> 97 MB); separate: keep the bf16 table. [default: head for w4a8 with its int8 head (rtn, gptq), else separate: a 4-bit head's rows lose more as embeddings]")] = None,
    portable: Annotated[bool, typer.Option("--portable", help="Only forms compressed-tensors holds, so transformers and vLLM read the child (int4: integer zero points even where free minimums fit far better, as on a model from a Q4_1 GGUF; AWQ refused).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a model to int8, int4, w8a8 or w4a8 (real integer weights: smaller and faster), as a new store model in
    compressed-tensors' format (transformers and vLLM read it), except AWQ and int4 with free minimums (chosen where
    they fit far better, as on the default model), which only slmkit reads: says so when it happens; --portable
    keeps to the standard forms."""
    from slmkit.compress.quantize_stage import quantize_stage
    from slmkit.evaluate.quick import describe_delta, quick_perplexity
    from slmkit.loading import load
    from slmkit.store import Store


    model = model_or_default(model)
    if scheme.lower().startswith("gguf:") or method == "qat":
        _qat(model, scheme, method, data, steps, lr, alpha, name, resume, as_json)
        return
    card = quantize_stage(model, scheme, method=method, group_size=group_size, calib=calib, name=name, portable=portable, head=head,
                          embedding=embedding)
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


def _qat(model: str, scheme: str, method: str, data: list[Path] | None, steps: int | None, lr: float | None,
         alpha: float | None, name: str | None, resume: bool, as_json: bool) -> None:
    """Quantization-aware training onto a llama.cpp type's grid (train/qat.py)."""
    from slmkit.errors import SlmkitError
    from slmkit.train.qat import ALPHA, LR, STEPS, qat_stage

    if not scheme.lower().startswith("gguf:") or method != "qat":
        raise SlmkitError(f"--scheme {scheme} with --method {method}: quantization-aware training is --scheme gguf:TYPE --method qat",
                          "For example: slmkit quantize MODEL --scheme gguf:Q4_0 --method qat --data train.txt; plain llama.cpp "
                          "types without training: slmkit export MODEL --type Q4_0.")
    if not data:
        raise SlmkitError("quantization-aware training needs text to train on", "Give --data FILE (text, JSON lines or CSV).")
    card = qat_stage(model, scheme, data, steps=steps or STEPS, lr=lr or LR, alpha=ALPHA if alpha is None else alpha, name=name,
                     resume=resume)
    if as_json:
        print_json(card)
        return
    v = card.settings["validation_perplexity"]
    t = card.settings["qat"]["type"]
    measured = (f"; validation perplexity {v['before']:.3f} rounded plainly, {v['after']:.3f} trained" if v["before"] and v["after"]
                else " (too little text to hold any out: no validation perplexity)")
    typer.echo(f"made {card.name}: weights on llama.cpp's {t} grid{measured}; its GGUF: slmkit export {card.name} --type {t}")
