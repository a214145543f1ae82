"""`slmkit route ...`: calibrate a router between a small and a large model on a labelled dev set, and look at one."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from slmkit.cli.common import JsonOpt, err_console, handle_errors, out_console, print_json
from slmkit.sources.forms import is_router, read_router

app = typer.Typer(help="Hybrid deployment: the small model first, a larger one when it is unsure.", no_args_is_help=True)


@app.command("calibrate")
@handle_errors
def calibrate(
    small: Annotated[str, typer.Option("--small", help="The small model (a store name): answers first.")],
    large: Annotated[str, typer.Option("--large", help="The large model: a store name, or an OpenAI-compatible URL (http://HOST:PORT/v1).")],
    task: Annotated[str | None, typer.Option("--task", help="Dev set: a multiple-choice task (arc_easy, a YAML task); serves --policy router.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dev set: JSON lines or CSV of prompts with reference answers or labels.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use the first N dev items.")] = None,
    target: Annotated[float | None, typer.Option("--target", help="Serve the least escalation reaching this share of the large model's quality (0.95).")] = None,
    max_escalation: Annotated[float | None, typer.Option("--max-escalation", help="Or: the best quality escalating at most this share (0.3).")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Or: this threshold on the policy's score (inside the dev set's range).")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="confidence (decide after the small answer) or router (decide before). [default: router for --task, confidence for --data]")] = None,
    signal: Annotated[str, typer.Option("--signal", help="Confidence signal: mean_logprob, min_logprob or neg_entropy.")] = "mean_logprob",
    metric: Annotated[str, typer.Option("--metric", help="QA quality: exact (labels such as intents) or rouge (ROUGE-L F1).")] = "exact",
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="The dev file's prompt field or CSV column.")] = None,
    answer_column: Annotated[str | None, typer.Option("--answer-column", help="The dev file's answer field or CSV column.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per QA answer.")] = 64,
    large_model: Annotated[str | None, typer.Option("--large-model", help="The model to ask at a --large URL (default: its first).")] = None,
    large_key: Annotated[str | None, typer.Option("--large-key", envvar="SLMKIT_LARGE_API_KEY", help="API key for a --large URL.")] = None,
    keyword: Annotated[list[str] | None, typer.Option("--keyword", help="Also escalate prompts with this word (repeatable).")] = None,
    max_chars: Annotated[int | None, typer.Option("--max-chars", help="Also escalate prompts longer than this.")] = None,
    pattern: Annotated[str | None, typer.Option("--regex", help="Also escalate prompts matching this regex.")] = None,
    backend: Annotated[str, typer.Option("--backend", "-b", help="Engine for local models: auto, llamacpp or torch.")] = "auto",
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="A data folder for --task.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Store name of the router (serve it under this name). [default: SMALL-route]")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the calibration report (curves, per-item results) here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure both models on a dev set, pick the threshold, save the router (with its curve plot) in the store."""
    from slmkit.route.calibrate import calibrate_stage
    from slmkit.route.policies import Rules
    from slmkit.store import Store

    rules = Rules(max_chars, tuple(keyword or ()), pattern) if (keyword or max_chars or pattern) else None
    card, report = calibrate_stage(small, large, task=task, data=data, limit=limit, target=target, max_escalation=max_escalation,
                                   threshold=threshold, policy=policy, signal=signal, metric=metric, prompt_column=prompt_column,
                                   answer_column=answer_column, max_tokens=max_tokens, large_model=large_model, large_key=large_key,
                                   rules=rules, name=name, data_dir=data_dir, backend=backend, out=out)
    if as_json:
        print_json({"card": asdict(card), "report": report})
        return
    p = report["picked"]
    con = out_console()
    con.print(f"{report['n']} dev items, {report['quality']}: small {report['small_quality']:.3f}, large {report['large_quality']:.3f}")
    for label, c in report["curves"].items():
        kept = c["kept_on_small_at_95pct"]
        con.print(f"  {label}: area over random {c['area_over_random']:+.4f}"
                  f"{'' if c['beats_random_everywhere'] else ' (below random somewhere)'}; "
                  f"kept on the small model at 95% of the large's quality: {'-' if kept is None else f'{kept:.0%}'}")
    con.print(f"Served policy: {report['policy']} at threshold {p['threshold']:.4f}: {p['escalated']:.0%} escalated, "
              f"quality {p['quality']:.3f} ({p['quality'] / report['large_quality']:.0%} of the large model's)"
              if report["large_quality"] else f"Served policy: {report['policy']} at threshold {p['threshold']:.4f}")
    folder = Store().path(card.name)
    err_console().print(f"Saved router [bold]{card.name}[/] (curve: {folder / 'calibration.png'}). Serve it: slmkit serve {card.name}")


@app.command("show")
@handle_errors
def show(name: Annotated[str, typer.Argument(help="A router in the store.")]) -> None:
    """A router's models, policies and calibration, as JSON."""
    from slmkit.errors import SlmkitError
    from slmkit.store import Store

    folder = Store().require(name)
    if not is_router(folder):
        raise SlmkitError(f"{name} is a model, not a router", "Make one with: slmkit route calibrate --small S --large L ...")
    out_console().print_json(json.dumps(read_router(folder)))


@app.command("harvest")
@handle_errors
def harvest_cmd(
    log: Annotated[Path, typer.Argument(help="An escalation log (slmkit serve --escalation-log FILE).")],
    out: Annotated[Path, typer.Option("--out", help="The training rows to write (JSON lines: chats, or texts).")],
    route: Annotated[str | None, typer.Option("--route", help="Only this router's escalations.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn what routers escalated (and the large model's answers) into training data for the next student:
    `slmkit finetune SMALL --data OUT` teaches it to answer those prompts itself, so fewer are escalated."""
    import os

    from slmkit.errors import SlmkitError
    from slmkit.route.harvest import harvest

    if not log.is_file():
        raise SlmkitError(f"{log} does not exist", "Serve a router with --escalation-log FILE first.")
    rows, skipped = harvest(log.read_text(encoding="utf-8").splitlines(), route)
    if not rows:
        raise SlmkitError(f"no escalations{f' of {route}' if route else ''} in {log}", "Serve longer, or check --route.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    summary = {"rows": len(rows), "skipped": skipped, "out": str(out)}
    if as_json:
        print_json(summary)
    else:
        typer.echo(f"{len(rows)} training rows in {out}" + (f" ({skipped} log lines skipped)" if skipped else ""))
