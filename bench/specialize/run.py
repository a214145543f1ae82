"""Specialize: the default model fine-tuned as a classifier, against the classic baseline, on the same splits.

Sets (from a data folder such as ../shared/data): the customer-support intents (27 labels) and banking77 (77 labels),
each split 80/20 by `slmkit data split` (seed 0, stratified by label); SST-2's 872 dev rows by 5-fold
cross-validation (`slmkit data split --folds 5`; labels "negative" / "positive"). Every row of the table uses the
same splits:

- tfidf-lr: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression (scikit-learn), C chosen by 3-fold
  cross-validation on the training rows: the baseline a practitioner tries first;
- zero-shot / few-shot: the base model, asked in its chat template to pick one of the labels (the question and the
  labels in the system message; few-shot: one answered example per label for up to `--shots` labels as earlier
  turns), answered by `Model.classify` (the likeliest label);
- full / lora: `slmkit finetune --task classify` (plain prompt format, the loss on the label alone), evaluated by
  `slmkit eval --responses HELDOUT --label-column label` (the classifier's own labels);
- student-full: the same full fine-tuning on a half-size student (`slmkit prune --structured width --ratio 0.5`).

Reported: accuracy with its standard error (binomial, over every held-out row: SST-2 pools its five folds), macro-F1,
training wall time and peak memory (the training process's maximum resident set), and classifications per second
(`eval`: one request at a time). Runs are cached under --work: a rerun measures only what is missing.

    .venv/bin/python bench/specialize/run.py --data ../shared/data [--rows tfidf-lr,zero-shot,few-shot,full,lora]
        [--sets customer_support,banking77,sst2] [--folds-run 5] [--epochs 1]
    .venv/bin/python bench/specialize/run.py --rows served --sets banking77   # the full classifiers, served

Writes bench/results/specialize.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BASE, RESULTS, ROOT, cpu_line, exists, slmkit  # noqa: E402  (bench/common.py)

SST2_NAMES = {"0": "negative", "1": "positive"}
SETS = {  # name: (file in the data folder, text column, label column, how it is split)
    "customer_support": ("customer_support/bitext_customer_support_4514_responses.csv", "instruction", "intent", "80/20"),
    "banking77": ("banking77/test.csv", "text", "category", "80/20"),
    "sst2": ("sst2/dev.tsv", "sentence", "label", "5-fold"),
}
ASK = {"customer_support": "Which intent is this customer message?", "banking77": "Which intent is this banking customer message?",
       "sst2": "Is the sentiment of this movie review positive or negative?"}
TRAIN = {"full": ["--method", "full", "--lr", "5e-5"], "lora": ["--method", "lora", "--r", "16", "--alpha", "32", "--lr", "1e-3"]}
TRAIN["student-full"] = TRAIN["full"]
STUDENT = f"{BASE}-half"  # width-pruned to half the parameters (no distillation: see the notes)
def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def prepare(data: Path, work: Path, env: dict[str, str]) -> dict[str, list[Path]]:
    """Each set's splits (folders with train.jsonl and heldout.jsonl of {text, label} rows), made by slmkit."""
    splits = {}
    for name, (file, text_col, label_col, how) in SETS.items():
        out = work / "splits" / name
        src = data / file
        if name == "sst2":  # labels as words, so that the base model's zero-shot row can read them
            named = work / "sst2.jsonl"
            with src.open(encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
            named.write_text("".join(json.dumps({"text": r[text_col].strip(), "label": SST2_NAMES[r[label_col]]}) + "\n" for r in rows))
            src, text_col, label_col = named, "text", "label"
        args = ["data", "split", str(src), "--out", str(out), "--seed", "0"] + (
            ["--folds", "5"] if how == "5-fold" else ["--held-out", "0.2"])
        args += ["--text-column", text_col, "--label-column", label_col] if src.suffix != ".jsonl" else ["--label-column", label_col]
        if not out.is_dir():
            slmkit(args, env)
        splits[name] = sorted(out.glob("fold-*")) if how == "5-fold" else [out]
    return splits


def pooled(parts: list[dict]) -> dict:
    """Accuracy and macro-F1 over every held-out row of the folds (predictions pooled), with the binomial stderr."""
    from slmkit.evaluate.metrics import classification_report

    pred = [p for part in parts for p in part["predicted"]]
    gold = [g for part in parts for g in part["gold"]]
    labels = sorted(set(gold))
    rep = classification_report(pred, gold, labels)
    acc = rep["accuracy"]
    return {"n": len(gold), "accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / len(gold)), "macro_f1": rep["macro_f1"]}


def tfidf_lr(split: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    train, held = read_rows(split / "train.jsonl"), read_rows(split / "heldout.jsonl")
    start = time.perf_counter()
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=3000))
    search = GridSearchCV(pipe, {"logisticregression__C": [1, 10, 100]}, cv=3)
    search.fit([r["text"] for r in train], [r["label"] for r in train])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = list(search.predict([r["text"] for r in held]))
    per_s = len(held) / (time.perf_counter() - start)
    return {"predicted": pred, "gold": [r["label"] for r in held], "train_s": train_s, "per_s": per_s,
            "C": search.best_params_["logisticregression__C"]}


def prompted(split: Path, set_name: str, shots: int, most: int | None = None) -> Path:
    """The held-out rows as chat prompts that name the labels (and, few-shot, answered examples as earlier turns);
    at most `most` of them, taken evenly through the file (which is grouped by label)."""
    train, held = read_rows(split / "train.jsonl"), read_rows(split / "heldout.jsonl")
    if most and len(held) > most:
        held = held[:: math.ceil(len(held) / most)]
    labels = sorted({r["label"] for r in train})
    examples = [{"role": "system", "content": f"{ASK[set_name]} Answer with one label from: {', '.join(labels)}."}]
    seen: set[str] = set()
    for r in train:  # the first training row of each label, up to `shots` labels
        if r["label"] not in seen and len(seen) < shots:
            seen.add(r["label"])
            examples += [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]
    path = split / f"prompted-{shots}.jsonl"
    path.write_text("".join(json.dumps({"messages": examples + [{"role": "user", "content": r["text"]},
                                                                {"role": "assistant", "content": r["label"]}]}) + "\n" for r in held))
    (split / "labels.txt").write_text("\n".join(labels) + "\n")
    return path


def evaluate(model: str, held: Path, split: Path, env: dict[str, str], extra: list[str], tag: str) -> dict:
    out = split / f"eval-{tag}.json"
    if not out.is_file():
        slmkit(["eval", model, "--responses", str(held), "--metric", "accuracy", "--out", str(out), *extra], env)
    r = json.loads(out.read_text())["results"]["responses"]
    return {"predicted": r["predicted"], "gold": r["gold"], "per_s": r["classifications_per_s"]}


def student(env: dict[str, str]) -> str:
    """The half-size student: the default model pruned in width (KV groups and MLP channels) to half its parameters."""
    if not exists(STUDENT, env):
        slmkit(["prune", BASE, "--structured", "width", "--ratio", "0.5", "--name", STUDENT], env)
    return STUDENT


def tagged(method: str, epochs: float) -> str:
    """A fine-tuned row's name: the method, and its epochs where they are not one (their runs are kept apart)."""
    return method if epochs == 1 else f"{method}-{epochs:g}ep"


def finetuned(method: str, set_name: str, split: Path, env: dict[str, str], epochs: float) -> dict:
    tag = tagged(method, epochs)
    name = f"{set_name}-{split.name}-{tag}".replace("_", "-")
    card_file = split / f"train-{tag}.json"
    base = student(env) if method.startswith("student-") else BASE
    if not card_file.is_file():
        _, peak = slmkit(["finetune", base, "--data", str(split / "train.jsonl"), "--task", "classify", "--label-column", "label",
                          "--prompt-format", "plain", "--epochs", str(epochs), "--batch-size", "16", "--bf16",
                          "--no-grad-checkpoint", "--eval-every", "100000", "--checkpoint-every", "100000", "--name", name,
                          *TRAIN[method]], env)
        card = json.loads(subprocess.run([sys.executable, "-m", "slmkit", "models", "show", name, "--json"], env=env,
                                         capture_output=True, text=True, check=True).stdout)
        card_file.write_text(json.dumps({"seconds": card["settings"]["seconds"], "peak_mb": peak, "steps": card["settings"]["steps"]}))
    trained = json.loads(card_file.read_text())
    got = evaluate(name, split / "heldout.jsonl", split, env, ["--label-column", "label"], tag)
    return {**got, "train_s": trained["seconds"], "peak_mb": trained["peak_mb"]}


def served(set_name: str, split: Path, env: dict[str, str], method: str = "full", clients: int = 4, most: int | None = None) -> dict:
    """Classifications per second through `slmkit serve` (POST /v1/classify, one text per request, `clients` at once)
    for the held-out rows (at most `most`, evenly through the file), and that every answer is the one `eval` gave."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sys.path.insert(0, str(ROOT / "bench" / "serve"))
    from run import free_port, start  # bench/serve/run.py: the server start (warmed up)

    name = f"{set_name}-{split.name}-{method}".replace("_", "-")
    texts = [r["text"] for r in read_rows(split / "heldout.jsonl")]
    want = json.loads((split / f"eval-{method}.json").read_text())["results"]["responses"]["predicted"]
    step = math.ceil(len(texts) / most) if most else 1
    texts, want = texts[::step], want[::step]
    url = f"http://127.0.0.1:{free_port()}"
    proc = start([sys.executable, "-m", "slmkit", "serve", name, "--port", url.rsplit(":", 1)[1]], url, env, name)
    try:
        with httpx.Client(timeout=600) as c:
            ask = lambda t: c.post(url + "/v1/classify", json={"model": name, "input": t}).json()["data"][0]["label"]  # noqa: E731
            ask(texts[0])
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                got = list(pool.map(ask, texts))
            seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    return {"set": set_name, "model": name, "n": len(texts), "clients": clients, "per_s": len(texts) / seconds,
            "same_as_eval": sum(a == b for a, b in zip(got, want)) / len(texts)}


def run_row(row: str, set_name: str, splits: list[Path], env: dict[str, str], epochs: float, shots: int,
            prompted_rows: int | None = None) -> dict:
    parts = []
    for split in splits:
        if row == "tfidf-lr":
            parts.append(tfidf_lr(split))
        elif row in ("zero-shot", "few-shot"):
            most = math.ceil(prompted_rows / len(splits)) if prompted_rows else None
            held = prompted(split, set_name, 0 if row == "zero-shot" else shots, most)
            parts.append(evaluate(BASE, held, split, env, ["--labels", str(split / "labels.txt")], row))
        else:
            parts.append(finetuned(row, set_name, split, env, epochs))
    out = {"row": row if row in ("tfidf-lr", "zero-shot", "few-shot") else tagged(row, epochs), "set": set_name,
           "splits": len(splits), **pooled(parts),
           "train_s": sum(p.get("train_s", 0) for p in parts) / len(parts) if any("train_s" in p for p in parts) else None,
           "peak_mb": max((p["peak_mb"] for p in parts if "peak_mb" in p), default=None),
           "per_s": sum(p["per_s"] for p in parts) / len(parts)}
    if row == "tfidf-lr":
        out["C"] = [p["C"] for p in parts]
    return out


def write(results: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "specialize.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    lines = [f"# specialize ({BASE} as a classifier vs TF-IDF + logistic regression)", "",
             f"Splits: customer-support intents and banking77 80/20 (seed 0, stratified), SST-2 dev 5-fold (pooled); "
             f"fine-tuning: 1 epoch (a row named -Nep: N epochs), batch 16, bf16 autocast, plain prompt format, loss on the label; "
             f"few-shot: {meta['shots']} answered examples"
             + (f"; zero- and few-shot score at most {meta['prompted_rows']} held-out rows per set (evenly through each split: "
                "the n column)" if meta.get("prompted_rows") else "") + f". CPU: {meta['cpu']}.", "",
             "| set | row | n | accuracy | ± stderr | macro-F1 | train s | peak MB | classifications/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['set']} | {r['row']} | {r['n']} | {r['accuracy']:.3f} | {r['accuracy_stderr']:.3f} | {r['macro_f1']:.3f} | "
                     f"{fmt(r['train_s'], '.0f')} | {fmt(r['peak_mb'], 'd')} | {fmt(r['per_s'], '.1f')} |")
    lines += ["", "## Targets", ""]
    by = {(r["set"], r["row"]): r for r in results}
    for s in SETS:
        tuned = [r for (s2, row), r in by.items() if s2 == s and row.split("-")[0] in ("full", "lora")]
        base, best = by.get((s, "tfidf-lr")), max(tuned, key=lambda r: r["accuracy"], default=None)
        if base and best:
            gap = best["accuracy"] - base["accuracy"]
            se = math.sqrt(best["accuracy_stderr"] ** 2 + base["accuracy_stderr"] ** 2)
            lines.append(f"- {s}: best fine-tuned ({best['row']}) {best['accuracy']:.3f} vs TF-IDF + LR {base['accuracy']:.3f}: "
                         f"{gap * 100:+.1f} points ({gap / se:+.1f} standard errors)")
        if (s, "student-full") in by and (s, "full") in by:
            st, full = by[(s, "student-full")], by[(s, "full")]
            lines.append(f"- {s}: the half-size student {st['accuracy']:.3f} vs the default model {full['accuracy']:.3f} "
                         f"({(st['accuracy'] - full['accuracy']) * 100:+.1f} points; target: within 2)")
    for r in meta.get("served", []):
        lines.append(f"- served ({r['model']}): {r['per_s']:.1f} classifications/s through POST /v1/classify, {r['clients']} "
                     f"clients, one text per request ({r['n']} held-out texts; {r['same_as_eval']:.1%} the same label as eval)")
    lines += ["", *meta.get("notes", [])]
    (RESULTS / "specialize.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-specialize"))
    ap.add_argument("--home", type=Path, default=None, help="SLMKIT_HOME with the default model (default: WORK/home)")
    ap.add_argument("--rows", default="tfidf-lr,zero-shot,few-shot,full,lora")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--folds-run", type=int, default=5, help="SST-2 folds to run for the model rows (all 5 for tfidf-lr)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--prompted-rows", type=int, default=None,
                    help="zero-/few-shot: score at most this many held-out rows per set, evenly through each split")
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args()
    env = {**os.environ, "SLMKIT_HOME": str(a.home or a.work / "home"), "PYTHONUNBUFFERED": "1"}
    a.work.mkdir(parents=True, exist_ok=True)
    splits = prepare(a.data, a.work, env)
    done = RESULTS / "specialize.json"
    before = json.loads(done.read_text())["meta"] if done.is_file() else {}
    meta = {"cpu": cpu_line(), "shots": a.shots, "folds_run": a.folds_run,
            "prompted_rows": a.prompted_rows or before.get("prompted_rows"), "notes": a.note or before.get("notes", [])}
    results = [r for r in json.loads(done.read_text())["rows"]] if done.is_file() else []
    if a.rows == "served":
        meta = {**before, "cpu": meta["cpu"]}
        meta["served"] = [served(s, splits[s][0], env, most=a.prompted_rows) for s in a.sets.split(",")]
        write(results, meta)
        return
    meta["served"] = before.get("served", [])
    for row in a.rows.split(","):
        for s in a.sets.split(","):
            use = splits[s] if row == "tfidf-lr" or s != "sst2" else splits[s][: a.folds_run]
            print(f"== {row} on {s} ({len(use)} split(s))", flush=True)
            start = time.perf_counter()
            r = run_row(row, s, use, env, a.epochs, a.shots, a.prompted_rows)
            print(f"   accuracy {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f}, macro-F1 {r['macro_f1']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            results = [x for x in results if (x["set"], x["row"]) != (s, r["row"])] + [r]
            write(results, meta)


if __name__ == "__main__":
    main()
