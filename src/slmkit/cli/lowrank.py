"""`slmkit lowrank`: linear layers replaced by two thin ones from an activation-aware truncated SVD."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.card import human_bytes, human_count
from slmkit.cli.common import JsonOpt, ModelOpt, handle_errors, model_or_default, print_json
from slmkit.compress.calibrate import CALIB_SAMPLES, CALIB_WINDOW


@handle_errors
def lowrank(
    model: ModelOpt = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Share of the model's parameters to keep, in (0, 1); ranks are chosen per layer.")] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="Share of each layer's (activation-whitened) output energy to keep, in (0, 1).")] = None,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration text (default: a public-domain novel sample shipped with slmkit).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration windows.")] = CALIB_SAMPLES,
    window: Annotated[int, typer.Option("--window", help="Tokens per calibration window.")] = CALIB_WINDOW,
    name: Annotated[str | None, typer.Option("--name", help="Name of the new model (default MODEL-lowrank-60pct or -95e).")] = None,
    ppl: Annotated[bool, typer.Option("--ppl/--no-ppl", help="Quick perplexity delta on a WikiText-2 sample.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Factorize a model's linear layers (activation-aware SVD) into a smaller model in the store."""
    from slmkit.compress.lowrank_stage import lowrank_stage
    from slmkit.store import Store

    model = model_or_default(model)
    card = lowrank_stage(model, ratio=ratio, energy=energy, calib=calib, samples=samples, window=window, name=name)
    if as_json:
        print_json(card)
        return
    parent = Store().card(model)
    size = lambda c: c.weights_bytes.get("safetensors") or c.size_bytes  # noqa: E731
    s = card.settings
    typer.echo(f"made {card.name}: {human_count(card.parameters)} parameters (was {human_count(parent.parameters)}), "
               f"{human_bytes(size(card))} on disk (was {human_bytes(size(parent))}); {s['factorized']} layers factorized, "
               f"{s['dense_layers']} kept dense")
    if ppl:
        from slmkit.evaluate.quick import describe_delta, quick_perplexity
        from slmkit.loading import load

        typer.echo(describe_delta(quick_perplexity(load(model)), quick_perplexity(load(card.name))))
