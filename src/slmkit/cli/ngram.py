"""`slmkit ngram`: a whitebox n-gram student read off a teacher (or the classic n-gram model of a text), as a store
model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.cli.common import JsonOpt, handle_errors, model_or_default, print_json
from slmkit.train.ngram import ORDER, Walk

_W = Walk()


@handle_errors
def ngram(
    data: Annotated[list[Path], typer.Option("--data", help="Domain text (plain text, JSONL or CSV; repeat for several files).")],
    name: Annotated[str, typer.Option("--name", help="Name of the n-gram model in the store.")],
    teacher: Annotated[str | None, typer.Option("--teacher", help="Store model (float weights) to read; its tokenizer is the n-gram's. Default: the default model.")] = None,
    from_text: Annotated[bool, typer.Option("--from-text", help="Count the text alone (the classic Kneser-Ney model; the teacher lends only its tokenizer).")] = False,
    teacher_only: Annotated[bool, typer.Option("--teacher-only", help="Count only what the teacher writes (its distributions along the text and its branches), not the text's own tokens.")] = False,
    teacher_weight: Annotated[float | None, typer.Option("--teacher-weight", help="Weight of the teacher's fractional counts beside the text's own (default: fitted on held-out text).")] = None,
    order: Annotated[int, typer.Option("--order", help="n: tokens per n-gram (the context is n-1 tokens).")] = ORDER,
    budget: Annotated[int, typer.Option("--budget", help="Tokens the teacher reads, text and branches.")] = _W.budget,
    depth: Annotated[int, typer.Option("--depth", help="Levels of branches below each position of the text.")] = _W.depth,
    branch: Annotated[int, typer.Option("--branch", help="Children of a node: the teacher's likeliest next tokens.")] = _W.branch,
    threshold: Annotated[float, typer.Option("--threshold", help="A branch goes on while its probability from where it left the text stays above this.")] = _W.threshold,
    top: Annotated[int, typer.Option("--top", help="Of the teacher's next tokens kept per visited context, as fractional counts.")] = _W.top,
    general: Annotated[Path | None, typer.Option("--general", help="General text: with it a branch goes on only while its tokens are likelier in the domain text than here (the domain gate).")] = None,
    gate: Annotated[float, typer.Option("--gate", help="With --general: the least sum of log(p_domain / p_general) over a branch's tokens.")] = _W.gate,
    max_entries: Annotated[int | None, typer.Option("--max-entries", help="Prune to about this many n-grams (the least counted go first).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A whitebox student: walk the teacher's likeliest branches from every position of your domain text, count its
    next-token distributions as fractional counts beside the text's own, smooth them (Kneser-Ney on expected counts)
    into an n-gram model stored as an ARPA file you can read. Runs, chats, evaluates and serves like any model."""
    from slmkit.train.ngram import ngram_stage

    walk = Walk(budget=budget, depth=depth, branch=branch, threshold=threshold, top=top, gate=gate)
    card = ngram_stage(model_or_default(teacher), data, name=name, from_text=from_text, teacher_only=teacher_only,
                       teacher_weight=teacher_weight, order=order, walk=walk,
                       general=general, max_entries=max_entries)
    if as_json:
        print_json(card)
        return
    s = card.settings
    ppl = f", held-out perplexity {s['held_out_perplexity']:.2f}" if s.get("held_out_perplexity") else ""
    source = ("the text" if from_text else f"{s['teacher_tokens']:,} tokens read by the teacher"
              + ("" if teacher_only else f" (weight {s['teacher_weight']}) and the text's {s['text_tokens']:,}"))
    typer.echo(f"made {card.name}: a {s['order']}-gram model with {sum(s['entries']):,} n-grams from {source}{ppl}; "
               f"run it as any model: slmkit run {card.name} ...; see its top contexts: slmkit models show {card.name}")
