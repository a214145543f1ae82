"""`slmkit prune`: sparsity (magnitude, Wanda, SparseGPT; unstructured or N:M), structured pruning to a parameter
target (depth or width), and a scan of what each block is worth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from slmkit.card import human_bytes, human_count
from slmkit.cli.common import JsonOpt, ModelOpt, handle_errors, model_or_default, out_console, print_json
from slmkit.compress.calibrate import CALIB_SAMPLES, CALIB_WINDOW
from slmkit.compress.prune_stage import RANKINGS, SCAN_SAMPLES, SCAN_WINDOW
from slmkit.errors import SlmkitError


@handle_errors
def prune(
    model: ModelOpt = None,
    method: Annotated[str | None, typer.Option("--method", help="Sparsity: magnitude, wanda or sparsegpt (with --sparsity or --pattern).")] = None,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Share of each row's weights to zero, in (0, 1).")] = None,
    pattern: Annotated[str | None, typer.Option("--pattern", help="N:M: at most N nonzero weights in every M (2:4).")] = None,
    structured: Annotated[str | None, typer.Option("--structured", help="depth (whole blocks) or width (KV groups and MLP channels).")] = None,
    target_params: Annotated[str | None, typer.Option("--target-params", help="Structured: parameters to keep, e.g. 70M.")] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Structured: share of the parameters to keep, in (0, 1).")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="Depth: how many decoder blocks to remove (instead of a target).")] = None,
    rank: Annotated[str, typer.Option("--rank", help="Depth: rank blocks by influence (1 - cos of input and output) or by the perplexity cost of removing each.")] = RANKINGS[0],
    vocab: Annotated[list[Path] | None, typer.Option("--vocab", help="Keep the tokens these corpus files (text or .jsonl) use; slices the embedding and head, rebuilds the tokenizer.")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="--vocab: keep only the N most frequent corpus tokens (plus the pieces that build them and the byte tokens).")] = None,
    scan: Annotated[bool, typer.Option("--scan", help="Show each block's importance and the perplexity cost of removing it; writes nothing.")] = False,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration text (default: a public-domain novel sample shipped with slmkit).")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help=f"Calibration windows. [default: {CALIB_SAMPLES}; --scan: {SCAN_SAMPLES}]")] = None,
    window: Annotated[int | None, typer.Option("--window", help=f"Tokens per calibration window. [default: {CALIB_WINDOW}; --scan: {SCAN_WINDOW}]")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the new model (default MODEL-METHOD-... or MODEL-depth-70m).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="--scan: where to write the HTML report with its plot.")] = None,
    ppl: Annotated[bool, typer.Option("--ppl/--no-ppl", help="Quick perplexity delta on a WikiText-2 sample.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Prune a model into a new store model: sparsity inside the weights, or a smaller model with fewer blocks,
    heads and channels."""
    from slmkit.compress import prune_stage as ps
    from slmkit.store import Store

    model = model_or_default(model)
    if keep is not None and not vocab:
        raise SlmkitError("--keep applies to --vocab", "Pass --vocab CORPUS with --keep N.")
    modes = [m for m, on in (("--method/--sparsity/--pattern", method or sparsity is not None or pattern), ("--structured", structured),
                             ("--vocab", vocab), ("--scan", scan)) if on]
    if len(modes) != 1:
        raise SlmkitError("choose one kind of pruning" if modes else "nothing to do",
                          "Pass --method with --sparsity or --pattern; or --structured with --target-params or --ratio; "
                          "or --vocab CORPUS; or --scan.")
    given = {k: v for k, v in {"calib": calib, "samples": samples, "window": window}.items() if v is not None}
    if scan:
        _show_scan(ps.scan(model, **given), html)
        return
    if vocab:
        from slmkit.compress.vocab_stage import vocab_stage

        card = vocab_stage(model, vocab, keep=keep, name=name)
    elif structured:
        card = ps.shrink_stage(model, structured=structured, target_params=ps.parse_count(target_params) if target_params else None,
                               ratio=ratio, blocks=blocks, rank=rank, name=name, **given)
    else:
        card = ps.prune_stage(model, method=method or ps.DEFAULT_METHOD, sparsity=sparsity, pattern=pattern, name=name, **given)
    if as_json:
        print_json(card)
        return
    parent = Store().card(model)
    size = lambda c: c.weights_bytes.get("safetensors") or c.size_bytes  # noqa: E731
    typer.echo(f"made {card.name}: {human_count(card.parameters)} parameters (was {human_count(parent.parameters)}), "
               f"{human_bytes(size(card))} on disk (was {human_bytes(size(parent))})")
    if card.settings.get("kind") == "vocabulary":
        typer.echo(f"vocabulary: {card.settings['kept']:,} tokens kept of {card.settings['vocab_before']:,} "
                   f"({card.settings['dropped']:,} dropped); the corpus encodes to the same tokens" if keep is None else
                   f"vocabulary: {card.settings['kept']:,} tokens kept of {card.settings['vocab_before']:,}")
    measured = card.settings.get("measured")
    if measured:
        typer.echo(f"sparsity: {measured['linear_sparsity']:.1%} of the decoder blocks' linear weights "
                   f"({measured['overall_sparsity']:.1%} of all parameters); {ps.DENSE_NOTE}")
    if ppl:
        from slmkit.evaluate.quick import describe_delta, quick_perplexity
        from slmkit.loading import load

        typer.echo(describe_delta(quick_perplexity(load(model)), quick_perplexity(load(card.name))))


def _show_scan(result: dict, html: Path | None) -> None:
    from datetime import datetime, timezone

    from slmkit.config import settings
    from slmkit.evaluate.report import write_scan_html

    table = Table(title=f"{result['model']}: what each block is worth (calibration perplexity {result['perplexity']:.3f})",
                  caption=f"{result['params_per_block']:,} parameters per block; influence = 1 - cos(block input, output)")
    for col in ("block", "influence", "ppl without it", "cost"):
        table.add_column(col, justify="right")
    for b in result["blocks"]:
        table.add_row(str(b["block"]), f"{b['influence']:.4f}", f"{b['perplexity_without']:.3f}", f"{b['cost']:+.1%}")
    out_console().print(table)
    layers = result.get("layers") or {}
    if layers:
        lt = Table(title="Per linear layer: share of Wanda score mass 50% sparsity removes (mean over blocks; max)")
        for col in ("layer", "mean", "max", "most sensitive block"):
            lt.add_column(col, justify="right" if col != "layer" else "left")
        for kind, values in sorted(layers.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
            lt.add_row(kind, f"{sum(values) / len(values):.1%}", f"{max(values):.1%}", str(values.index(max(values))))
        out_console().print(lt)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = html or settings().reports_dir / f"scan-{result['model']}-{stamp}.html"
    write_scan_html(result, target)
    typer.echo(f"report: {target}")
