"""Compare eval results: a table for the terminal and a self-contained HTML report with Pareto plots."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit.evaluate.metrics import pareto_front
from slmkit.train.curves import loss_curves_png


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    lower_is_better: bool
    fmt: str


def weights_size(card: dict[str, Any], backend: str | None) -> int | None:
    """Bytes of the weights the backend ran (GGUF for llama.cpp, safetensors for torch), else the folder size."""
    weights = card.get("weights_bytes") or {}
    return weights.get("gguf" if backend == "llamacpp" else "safetensors") or card.get("size_bytes")


def short_labels(names: list[str]) -> tuple[str, list[str]]:
    """Replace the leading '-'-separated words all model names share by '…', so a terminal table fits:
    ['m-7b', 'm-7b-int8', 'm-7b (llamacpp)'] -> ('m-7b', ['…', '…-int8', '… (llamacpp)']). Fewer than two
    names, or nothing shared: unchanged."""
    if len(names) < 2:
        return "", list(names)
    parts = [n.partition(" ") for n in names]  # "name (backend)" -> name, " ", "(backend)"
    words = [base.split("-") for base, _, _ in parts]
    common = 0
    while all(len(w) > common for w in words) and len({w[common] for w in words}) == 1:
        common += 1
    if common == 0:
        return "", list(names)
    labels = []
    for w, (_, _, tail) in zip(words, parts):
        rest = "-".join(w[common:])
        labels.append("…" + (f"-{rest}" if rest else "") + (f" {tail}" if tail else ""))
    return "-".join(words[0][:common]), labels


def rows_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten each result into one row of comparable numbers (None where not measured)."""
    rows = []
    for res in results:
        r = res.get("results", {})
        card = (res.get("model") or {}).get("card") or {}
        speed = r.get("speed") or {}
        ppl = r.get("perplexity") or {}
        kl = r.get("kl") or {}
        backend = res["model"].get("backend")
        row: dict[str, Any] = {
            "model": res["model"]["name"] + (f" ({backend})" if backend and backend != "torch" else ""),
            "backend": res["model"].get("backend"),
            "parameters": card.get("parameters") or speed.get("parameters"),
            "size_mb": (speed.get("size_bytes") or weights_size(card, res["model"].get("backend")) or 0) / 1e6 or None,
            "perplexity": ppl.get("perplexity"),
            "bits_per_byte": ppl.get("bits_per_byte"),
            "mean_kl": kl.get("mean_kl"),
            "top1_agreement": kl.get("top1_agreement"),
            "ttft_s": speed.get("time_to_first_token_s"),
            "prefill_tps": speed.get("prefill_tokens_per_s"),
            "decode_tps": speed.get("decode_tokens_per_s"),
            "batched_tps": speed.get("batched_tokens_per_s"),
            "peak_rss_mb": speed.get("peak_rss_mb"),
            "sparsity": (r.get("sparsity") or {}).get("linear_sparsity"),
        }
        for name, t in (r.get("tasks") or {}).items():
            row[f"{name}.acc"] = t["acc"]
            row[f"{name}.acc_norm"] = t.get("acc_norm")
            row[f"{name}.acc_stderr"] = t.get("acc_stderr")  # for error bars, not a column
            row[f"{name}.acc_norm_stderr"] = t.get("acc_norm_stderr")
            row[f"{name}.n"] = t.get("n")
            row[f"{name}.ppl"] = t.get("perplexity")  # LAMBADA-style tasks
        resp = r.get("responses")
        if resp:
            row[f"responses.{resp['metric']}"] = resp[resp["metric"]]
            row["responses.ppl"] = resp.get("response_perplexity")
            row["responses.macro_f1"] = resp.get("macro_f1")  # label rows (--metric accuracy)
        for name, suite in (r.get("suites") or {}).items():
            row[f"suite:{name}"] = suite["average"]
        rows.append(row)
    return rows


def columns_of(rows: list[dict[str, Any]]) -> list[Column]:
    fixed = [
        Column("parameters", "params", True, "{:,.0f}"), Column("size_mb", "size MB", True, "{:.1f}"),
        Column("perplexity", "ppl", True, "{:.3f}"), Column("bits_per_byte", "bits/byte", True, "{:.4f}"),
        Column("mean_kl", "KL", True, "{:.4f}"), Column("top1_agreement", "top-1 agree", False, "{:.3f}"),
        Column("ttft_s", "TTFT s", True, "{:.3f}"), Column("prefill_tps", "prefill tok/s", False, "{:.1f}"),
        Column("decode_tps", "decode tok/s", False, "{:.1f}"), Column("batched_tps", "batched tok/s", False, "{:.1f}"),
        Column("peak_rss_mb", "peak RSS MB", True, "{:.0f}"), Column("sparsity", "sparsity", False, "{:.1%}"),
    ]
    suite_keys = sorted({k for row in rows for k in row if k.startswith("suite:")})
    task_keys = sorted({k for row in rows for k in row if k.endswith((".acc", ".acc_norm", ".ppl", ".rouge_l", ".exact_match", ".accuracy", ".macro_f1"))})
    cols = (fixed + [Column(k, f"{k[len('suite:'):]} suite (avg)", False, "{:.4f}") for k in suite_keys]
            + [Column(k, k, k.endswith(".ppl"), "{:.3f}" if k.endswith(".ppl") else "{:.4f}") for k in task_keys])
    return [c for c in cols if any(row.get(c.key) is not None for row in rows)]


def fmt(col: Column, value: Any) -> str:
    return "-" if value is None else col.fmt.format(value)


def stderr_of(col: Column, row: dict[str, Any]) -> float | None:
    return row.get(col.key + "_stderr")


def cell(col: Column, row: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """A value with its standard error where it has one (task accuracies), and its change from the baseline row."""
    value = row.get(col.key)
    text = fmt(col, value)
    se = stderr_of(col, row)
    if value is not None and se:
        text += f" ± {se:.3f}"
    if base is not None and base is not row and value is not None and base.get(col.key):
        text += f" ({(value - base[col.key]) / abs(base[col.key]):+.1%})"
    return text


def titled(col: Column, rows: list[dict[str, Any]]) -> str:
    """A column's title, with the number of items behind an accuracy (n) when every row has the same."""
    ns = {row.get(col.key.rsplit(".", 1)[0] + ".n") for row in rows if row.get(col.key) is not None}
    return f"{col.title} (n={ns.pop()})" if len(ns) == 1 and None not in ns and "." in col.key else col.title


def noise_notes(rows: list[dict[str, Any]], cols: list[Column], base: dict[str, Any] | None = None) -> list[str]:
    """Accuracies whose differences (from the baseline, or between the models) are inside two standard errors."""
    notes = []
    for col in cols:
        have = [r for r in rows if r.get(col.key) is not None and stderr_of(col, r)]
        if len(have) < 2:
            continue
        ref = base if base is not None and base in have else None
        pairs = [(ref, r) for r in have if r is not ref] if ref else [(a, b) for i, a in enumerate(have) for b in have[i + 1:]]
        if all(abs(a[col.key] - b[col.key]) < 2 * (stderr_of(col, a) ** 2 + stderr_of(col, b) ** 2) ** 0.5 for a, b in pairs):
            notes.append(f"{col.title}: every difference is within two standard errors (noise at this n)")
    return notes


def baseline_row(rows: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    for row in rows:
        if row["model"] == name or row["model"].split(" (")[0] == name:
            return row
    from slmkit.errors import SlmkitError

    raise SlmkitError(f"--baseline {name!r} is not among the compared models", f"Models: {', '.join(r['model'] for r in rows)}")


def quality_axes(columns: list[Column]) -> list[Column]:
    """The quality metrics worth plotting against size and speed."""
    keys = ["bits_per_byte", "mean_kl"] + [c.key for c in columns if c.key.endswith((".acc_norm", ".rouge_l", ".exact_match", ".accuracy"))
                                           or c.key.startswith("suite:")]
    return [c for c in columns if c.key in keys]


def _plot(rows: list[dict[str, Any]], quality: Column, cost: Column) -> str | None:
    """A scatter of quality against a cost axis with the Pareto front marked; PNG as base64, or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [row for row in rows if row.get(cost.key) is not None and row.get(quality.key) is not None]
    if not kept:
        return None
    pts = [(row[cost.key], row[quality.key], row["model"]) for row in kept]
    errs = [row.get(quality.key + "_stderr") or 0.0 for row in kept]  # task accuracies carry a standard error
    ns = sorted({row.get(quality.key.rsplit(".", 1)[0] + ".n") for row in kept} - {None})
    front = pareto_front([(x, y) for x, y, _ in pts], lower_x_better=cost.lower_is_better, lower_y_better=quality.lower_is_better)
    fig, ax = plt.subplots(figsize=(6.2, 4.2), layout="constrained")
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=errs if any(errs) else None, fmt="o", color="#888",
                ecolor="#bbb", capsize=3, zorder=2, label="± 1 standard error" if any(errs) else None)
    fp = sorted((pts[i] for i in front), key=lambda p: p[0])
    ax.plot([p[0] for p in fp], [p[1] for p in fp], "-o", color="#d62728", zorder=3, label="Pareto front")
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, annotation_clip=False)
    better = lambda lower: "lower is better" if lower else "higher is better"
    ax.set_xlabel(f"{cost.title} ({better(cost.lower_is_better)})")
    ax.set_ylabel(f"{quality.title} ({better(quality.lower_is_better)})")
    ax.set_title(f"{quality.title} vs {cost.title}" + (f" (n = {', '.join(map(str, ns))})" if ns else ""))
    ys = [p[1] for p in pts]
    lo, hi = min(y - e for y, e in zip(ys, errs)), max(y + e for y, e in zip(ys, errs))
    mid, span = (lo + hi) / 2, hi - lo
    floor = 0.02 * abs(mid)  # a spread under 2% is not drawn as a steep slope
    if span < floor:
        ax.set_ylim(mid - floor, mid + floor)
    ax.margins(x=0.35, y=0.2)  # room for the model names
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def confusion_png(model: str, resp: dict[str, Any]) -> str:
    """A label evaluation's confusion matrix (rows: the reference label, columns: the answer), counts in the cells,
    only the labels that occur; PNG as base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = resp["confusion"]
    seen = [c for c in resp["labels"] if sum(confusion.get(c, {}).values()) or any(row.get(c) for row in confusion.values())]
    counts = [[confusion.get(g, {}).get(p, 0) for p in seen] for g in seen]
    size = max(3.5, 0.35 * len(seen) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(seen)), seen, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(seen)), seen, fontsize=7)
    half = max(map(max, counts)) / 2 if counts else 0  # darker cells get white text
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > half else "black")
    ax.set_xlabel("answer")
    ax.set_ylabel("reference")
    ax.set_title(f"{model}\naccuracy {resp['accuracy']:.3f}, macro-F1 {resp['macro_f1']:.3f} (n = {resp['n']})", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def labels_html(results: list[dict[str, Any]]) -> str:
    """For every label evaluation (`eval --responses --metric accuracy`): per-class precision, recall, F1 and support,
    and the confusion matrix."""
    parts = []
    for res in results:
        resp = (res.get("results") or {}).get("responses") or {}
        if resp.get("metric") != "accuracy":
            continue
        name = html.escape(res["model"]["name"])
        rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td>"
                       f"<td>{v['support']}</td></tr>" for c, v in resp["per_class"].items() if v["support"] or v["precision"])
        parts.append(f"<h3>{name}</h3><table><thead><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
                     f"</tr></thead><tbody>{rows}</tbody></table>"
                     f'<figure><img alt="{name} confusion matrix" src="data:image/png;base64,{confusion_png(res["model"]["name"], resp)}"></figure>')
    return ("<h2>Labels</h2><p>Each answer is the likeliest of the labels. Labels with no reference and no answer are left "
            "out.</p>" + "".join(parts)) if parts else ""


def write_scan_html(scan: dict[str, Any], path: Path) -> Path:
    """`slmkit prune --scan`: per-block influence and the perplexity cost of removing each block, plotted and tabled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = scan["blocks"]
    idx = [b["block"] for b in blocks]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax1.bar(idx, [b["influence"] for b in blocks], color="#1f77b4")
    ax1.set_ylabel("influence (1 - cos in/out)")
    ax1.set_title(f"{scan['model']}: what each decoder block is worth")
    ax2.bar(idx, [100 * b["cost"] for b in blocks], color="#d62728")
    ax2.set_ylabel("perplexity cost of removing it (%)")
    ax2.set_xlabel("decoder block")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    rows = "".join(f"<tr><td>{b['block']}</td><td>{b['influence']:.4f}</td><td>{b['perplexity_without']:.3f}</td>"
                   f"<td>{100 * b['cost']:+.1f}%</td></tr>" for b in blocks)
    kinds = sorted(scan.get("layers") or {})
    layer_head = "".join(f"<th>{html.escape(k)}</th>" for k in kinds)
    layer_rows = "".join("<tr><td>" + str(i) + "</td>" + "".join(f"<td>{100 * scan['layers'][k][i]:.1f}%</td>" for k in kinds) + "</tr>"
                         for i in range(len(blocks)) if kinds)
    cal = scan.get("calibration") or {}
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slmkit prune --scan: {html.escape(scan['model'])}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }} table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}</style></head><body>
<h1>{html.escape(scan['model'])}: block importance</h1>
<p>Calibration: {html.escape(str(cal.get('file')))}, {cal.get('windows')} windows of {cal.get('window')} tokens; perplexity
{scan['perplexity']:.3f} with every block. {scan['params_per_block']:,} parameters per block of {scan['params']:,}.
Depth pruning (<code>slmkit prune --structured depth</code>) removes the blocks of lowest influence.</p>
<figure><img alt="block importance" src="data:image/png;base64,{png}"></figure>
<table><thead><tr><th>block</th><th>influence</th><th>perplexity without it</th><th>cost</th></tr></thead><tbody>{rows}</tbody></table>
<h2>Per linear layer: what 50% sparsity would cost</h2>
<p>The share of each layer's Wanda score mass (|W| x ||X||, calibration activations) that pruning half of every row removes:
higher means more sensitive to pruning.</p>
<table><thead><tr><th>block</th>{layer_head}</tr></thead><tbody>{layer_rows}</tbody></table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    return path


def write_html(results: list[dict[str, Any]], path: Path, sources: list[str], baseline: str | None = None) -> Path:
    rows = rows_of(results)
    cols = columns_of(rows)
    base = baseline_row(rows, baseline)
    head = "".join(f"<th>{html.escape(titled(c, rows))}</th>" for c in cols)
    body = "".join(
        "<tr><td>" + html.escape(row["model"]) + (" (baseline)" if row is base else "") + "</td>"
        + "".join(f"<td>{html.escape(cell(c, row, base))}</td>" for c in cols) + "</tr>"
        for row in rows
    )
    warnings = "".join(f"<p class=\"noise\">{html.escape(n)}</p>" for n in noise_notes(rows, cols, base))
    cost_cols = [c for c in cols if c.key in ("size_mb", "decode_tps")]
    images = []
    for q in quality_axes(cols):
        for cost in cost_cols:
            png = _plot(rows, q, cost)
            if png:
                images.append(f'<figure><img alt="{html.escape(q.title)} vs {cost.title}" src="data:image/png;base64,{png}"></figure>')
    trained = {res["model"]["name"]: (res["model"].get("card") or {}).get("settings", {}).get("loss_curve") or [] for res in results}
    curve_png = loss_curves_png(trained)
    training = (f'<h2>Training</h2><p>Models made by slmkit distill or finetune, from their cards.</p>'
                f'<figure><img alt="loss curves" src="data:image/png;base64,{base64.b64encode(curve_png).decode()}"></figure>') if curve_png else ""
    notes = "".join(f"<li><code>{html.escape(s)}</code></li>" for s in sources)
    settings = "".join(
        f"<li>{html.escape(res['model']['name'])}: {html.escape(str({k: v for k, v in res.get('settings', {}).items() if v}))}</li>"
        for res in results
    )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slmkit comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5rem; }}
.noise {{ color: #a60; }}
</style></head><body>
<h1>slmkit comparison</h1>
<table><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>
<p>± one standard error; n: items behind an accuracy{"; in brackets: the change from the baseline" if base else ""}.</p>
{warnings}
<h2>Quality against size and speed</h2>
<p>Red: the Pareto front (no other model is better on both axes).</p>
{''.join(images) or '<p>Not enough measurements to plot: run slmkit eval with --ppl or --task, and --speed.</p>'}
{training}
{labels_html(results)}
<h2>Settings</h2><ul>{settings}</ul>
<h2>Results files</h2><ul>{notes}</ul>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    return path
