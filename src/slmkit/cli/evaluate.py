"""`slmkit eval` (measure a model) and `slmkit compare` (put results side by side, with an HTML report)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from slmkit.cli.common import BackendOpt, ModelOpt, handle_errors, out_console
from slmkit.config import settings
from slmkit.data.classify import check_labels, task_of
from slmkit.errors import SlmkitError
from slmkit.evaluate.perplexity import CONTEXT_LENGTH, STRIDE
from slmkit.evaluate.report import baseline_row, cell, columns_of, noise_notes, rows_of, short_labels, titled, write_html
from slmkit.evaluate.results import load_result
from slmkit.evaluate.run import evaluate, latest_result_for
from slmkit.loading import load


def tasks_table(data_dir: Path | None) -> Table:
    """The built-in tasks: what each scores, its dataset and where that data would come from now."""
    from slmkit.data.catalog import get_dataset
    from slmkit.data.locate import where
    from slmkit.evaluate.tasks import BUILTIN, MMLU_SUBJECTS, SUITES

    table = Table(title="Built-in tasks (lm-evaluation-harness's prompts and metrics)",
                  caption="data: where it comes from now; missing: slmkit data fetch DATASET (see slmkit data list)")
    for col in ("task", "what", "split, rows", "data", "suites"):
        table.add_column(col, no_wrap=col in ("task", "data"))
    for spec in BUILTIN.values():
        ds = get_dataset(spec.dataset or "")
        f = ds.file(spec.split)
        found = where(ds.name, data_dir=data_dir)[0]
        suites = ", ".join(k for k, v in SUITES.items() if spec.name in v)
        table.add_row(spec.name, spec.title, f"{f.split}, {f.rows:,}", found.origin, suites)
    table.add_row("mmlu_<subject>", f"one of MMLU's {len(MMLU_SUBJECTS)} subjects (_5shot: 5-shot)", "", "", "")
    return table


def _table(results: list[dict[str, Any]], title: str, baseline: str | None = None) -> Table:
    rows = rows_of(results)
    cols = columns_of(rows)
    base = baseline_row(rows, baseline)
    prefix, labels = short_labels([row["model"] for row in rows])
    notes = noise_notes(rows, cols, base)
    table = Table(title=title + (f" (… = {prefix})" if prefix else ""),
                  caption="\n".join(["± one standard error" + ("; (change from the baseline)" if base else ""), *notes]))
    table.add_column("metric", no_wrap=True)
    for label, row in zip(labels, rows):
        table.add_column(label + (" (baseline)" if row is base else ""), justify="right", no_wrap=True)
    for c in cols:  # one row per metric: fits a terminal better than one column per metric
        table.add_row(titled(c, rows), *(cell(c, row, base) for row in rows))
    return table


def read_labels(given: str | None) -> list[str] | None:
    """--labels: a file with one label a line, or a comma-separated list (data/classify.check_labels: two or more)."""
    if not given:
        return None
    path = Path(given)
    items = path.read_text(encoding="utf-8").splitlines() if path.is_file() else given.split(",")
    return check_labels([x for x in items if x.strip()])


@handle_errors
def eval_cmd(
    model_name: ModelOpt = None,
    ppl: Annotated[str | None, typer.Option("--ppl", help="Perplexity over a text file (or 'wikitext2').")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Task: a built-in name (see --list-tasks) or a task YAML file. Repeatable.")] = None,
    suite: Annotated[list[str] | None, typer.Option("--suite", help="A named set of tasks, reported with their average: small, arc, mmlu. Repeatable.")] = None,
    speed: Annotated[bool, typer.Option("--speed", help="Time to first token, prefill/decode tokens/s, memory, size.")] = False,
    kl: Annotated[str | None, typer.Option("--kl", help="Reference model (teacher) for KL divergence and top-1 agreement.")] = None,
    kl_text: Annotated[str | None, typer.Option("--kl-text", help="Text for --kl (default: the --ppl text, else wikitext2).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N task items / perplexity or KL windows.")] = None,
    context_length: Annotated[int, typer.Option("--context-length", help="Perplexity window in tokens.")] = CONTEXT_LENGTH,
    stride: Annotated[int, typer.Option("--stride", help="New tokens scored per perplexity window.")] = STRIDE,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the results JSON here.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="A folder of evaluation data to look in first (default: SLMKIT_DATA; see `slmkit data list`).")] = None,
    list_tasks: Annotated[bool, typer.Option("--list-tasks", help="List the built-in tasks and suites, with their data's source and size, and exit.")] = False,
    responses: Annotated[Path | None, typer.Option("--responses", help="Held-out prompts with reference responses (chat JSON lines, Alpaca, CSV): answer quality and response perplexity.")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="For --responses: rouge_l (free answers), exact_match (a generated label), or accuracy (labels: the likeliest of the labels, so always a valid one; with macro-F1 and per-class precision and recall). [default: accuracy for a classifier from finetune --task classify, else rouge_l]", show_default=False)] = None,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="For a --responses CSV: the prompt column.")] = None,
    response_column: Annotated[str | None, typer.Option("--response-column", help="For a --responses CSV: the response column.")] = None,
    text_column: Annotated[str | None, typer.Option("--text-column", help="For --responses rows of a text and a label (CSV/TSV, JSON lines, a saved Hugging Face dataset): the text column (default 'text').")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="For --responses: the label column of such rows.")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="For --metric accuracy: the label set, comma-separated or a file with one label a line (default: the classifier's own labels, else the labels the file's references use).")] = None,
    prompt_format: Annotated[str | None, typer.Option("--prompt-format", help="For --metric accuracy: chat or plain ('TEXT\\nLabel:') [default: the classifier's own, else chat where the model has a chat template]", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results JSON instead of the table.")] = False,
    backend: BackendOpt = "torch",
) -> None:
    """Measure a model: perplexity and bits per byte, task accuracy, answers against references, KL from a teacher, speed and memory."""
    if list_tasks:
        out_console().print(tasks_table(data_dir))
        return
    if not (ppl or task or suite or speed or kl or responses):
        raise SlmkitError("nothing to measure", "Pass at least one of --ppl FILE, --task NAME, --suite NAME, --responses FILE, --speed, --kl MODEL.")
    if limit is not None and limit < 1:
        raise SlmkitError("--limit must be at least 1", "Leave it out to use everything.")
    model = load(model_name, backend=backend)
    reference = load(kl, backend=backend) if kl else None
    if metric is None:
        metric = "accuracy" if task_of(model.card.settings if model.card else None) else "rouge_l"
    result, archived = evaluate(
        model, ppl=ppl, tasks=list(task or []), suites=list(suite or []), speed=speed, data_dir=data_dir, kl=reference, kl_text=kl_text, limit=limit,
        context_length=context_length, stride=stride, out=out, responses=responses, response_metric=metric,
        response_labels=read_labels(labels), response_prompt_format=prompt_format,
        response_read={k: v for k, v in {"prompt_column": prompt_column, "response_column": response_column,
                                         "text_column": text_column, "label_column": label_column}.items() if v},
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    out_console().print(_table([result], f"slmkit eval: {model.name}"))
    typer.echo(f"results: {out or archived}")


@handle_errors
def compare(
    items: Annotated[list[str], typer.Argument(help="Results JSON files, or model names (their latest eval).")],
    html: Annotated[Path | None, typer.Option("--html", help="Where to write the HTML report.")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="A compared model: every value also shown as its change from that model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the compared rows as JSON (one object per model) instead of the table.")] = False,
) -> None:
    """Put eval results side by side: a table here, and an HTML report with quality-vs-size/speed plots."""
    paths = []
    for item in items:
        p = Path(item)
        if p.suffix == ".json" or p.exists():
            paths.append(p)
            continue
        found = latest_result_for(item)
        if found is None:
            raise SlmkitError(f"{item!r} is neither a results file nor a model with saved eval results",
                              f"Run: slmkit eval {item} --ppl wikitext2 --speed (or give a results .json path).")
        paths.append(found)
    results = [load_result(p) for p in paths]
    baseline_row(rows_of(results), baseline)  # an unknown baseline fails before anything is written
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = html or settings().reports_dir / f"compare-{stamp}.html"
    write_html(results, target, [str(p) for p in paths], baseline)
    if as_json:
        typer.echo(json.dumps({"rows": rows_of(results), "report": str(target)}, indent=2))
        return
    out_console().print(_table(results, "slmkit compare", baseline))
    typer.echo(f"report: {target}")
