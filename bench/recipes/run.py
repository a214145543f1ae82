"""Recipes benchmark: the shipped "route" recipe (recipes/route.yaml) on the customer-support set, then one flywheel
round, all through the commands a user runs.

1. `slmkit recipe run`: the default model (teacher) width-pruned to half, distilled on the training rows, and a
   confidence router calibrated on the dev rows (ROUGE-L F1 against the reference answer, 95% of the teacher's
   quality). Each step's wall time.
2. Held-out rows, each asked of the student alone, the teacher alone and the router (one `slmkit serve` with all
   three, greedy, as the router was calibrated): quality of each, and the share the router kept on the student.
3. The flywheel: the router served with `--escalation-log` answers prompts of the same kind (not the held-out ones);
   `slmkit route harvest` turns its escalations into rows; the same recipe, extended by a finetune step (the next
   student, on those rows) and a route step, runs again (the steps before are skipped: unchanged); held-out again.

    .venv/bin/python bench/recipes/run.py --data ../shared/data [--distill-steps 200] [--dev 60] [--heldout 60]
        [--flywheel 200] [--train-rows 1200] [--work /tmp/slmkit-recipes]

Writes bench/results/recipes.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, cpu_line, RESULTS, SLMKIT  # noqa: E402

CSV = "customer_support/bitext_customer_support_4514_responses.csv"
STEPS = ("half", "student", "router", "fly", "next", "router2")
MAX_TOKENS = 48
MIN_ROWS = 8  # harvested rows the next student needs (one batch)
RESERVED = 400  # the first rows after the shuffle: dev, held-out and flywheel prompts are drawn from them  # the router is calibrated and asked with this answer length


def prepare(data: Path, work: Path, a: argparse.Namespace) -> dict[str, Path]:
    """Shuffled (seed 0) rows: dev and held-out {prompt, answer} and flywheel prompts from the first RESERVED, the
    rest as training chats."""
    with (data / CSV).open(encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["instruction"].strip() and r["response"].strip()]
    random.Random(0).shuffle(rows)
    if a.dev + a.heldout + a.flywheel > RESERVED:
        raise SystemExit(f"dev + heldout + flywheel must be at most {RESERVED} rows")
    dev, held = rows[:a.dev], rows[a.dev:a.dev + a.heldout]
    fly = rows[a.dev + a.heldout:a.dev + a.heldout + a.flywheel]
    train = rows[RESERVED:RESERVED + a.train_rows]  # the same file whatever the other parts' sizes (the teacher's cache is kept)
    files = {"train": work / "train.jsonl", "dev": work / "dev.jsonl", "heldout": work / "heldout.jsonl", "flywheel": work / "flywheel.jsonl"}
    write = lambda p, xs: p.write_text("".join(json.dumps(x) + "\n" for x in xs))  # noqa: E731
    write(files["train"], [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]} for r in train])
    for key, part in (("dev", dev), ("heldout", held), ("flywheel", fly)):
        write(files[key], [{"prompt": r["instruction"], "answer": r["response"]} for r in part])
    return files


def recipe_text(a: argparse.Namespace, flywheel: bool) -> str:
    """recipes/route.yaml with this bench's data and distillation budget; the flywheel round adds two steps."""
    text = (f"name: bench-route\nteacher: {BASE}\ndata:\n  train: train.jsonl\n  dev: dev.jsonl\n  harvest: harvest.jsonl\nsteps:\n"
            f"  - id: half\n    prune: {{structured: width, ratio: 0.5}}\n"
            f"  - id: student\n    distill: {{data: train, steps: {a.distill_steps}, seq_len: 256, batch_size: 8, lr: 0.0003, bf16: true}}\n"
            f"  - id: router\n    route: {{data: dev, target: 0.95, metric: rouge, max_tokens: {MAX_TOKENS}}}\n"
            # the flywheel's router: the same student escalating its least confident half, so that there is something to learn
            f"  - id: fly\n    from: student\n    route: {{data: dev, max_escalation: {a.fly_escalation}, metric: rouge, max_tokens: {MAX_TOKENS}}}\n")
    if flywheel:
        text += (f"  - id: next\n    from: student\n    finetune: {{data: harvest, method: full, epochs: {a.flywheel_epochs}, seq_len: 256, "
                 f"batch_size: 8, lr: 0.0001, bf16: true}}\n"
                 f"  - id: router2\n    route: {{data: dev, target: 0.95, metric: rouge, max_tokens: {MAX_TOKENS}}}\n")
    return text


def run_recipe(path: Path, env: dict[str, str]) -> dict[str, float]:
    """`slmkit recipe run`; each step's wall time from the moment the runner names it to the next (seconds)."""
    proc = subprocess.Popen(SLMKIT + ["recipe", "run", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, str, float]] = []
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        head = line.strip().split(":", 1)
        if len(head) == 2 and head[0] in STEPS and head[1].strip().startswith(("making", "done", "its settings")):
            marks.append((head[0], head[1].strip(), time.perf_counter()))
            print(line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise RuntimeError("recipe run failed:\n" + "".join(tail))
    end = time.perf_counter()
    return {step: round((marks[i + 1][2] if i + 1 < len(marks) else end) - t, 1)
            for i, (step, what, t) in enumerate(marks) if not what.startswith("done")}


def held_out(models: dict[str, str], rows: list[dict], env: dict[str, str], log: Path | None = None) -> dict:
    """Each row asked of each served name (greedy, MAX_TOKENS): ROUGE-L F1 against the reference, and for a router
    the share its student answered."""
    import httpx

    from slmkit.route.devset import quality

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    names = list(dict.fromkeys(models.values()))
    extra = ["--escalation-log", str(log), "--escalation-log-rows", "100000"] if log else []
    decisions = Path(env["SLMKIT_HOME"]) / "bench-decisions.jsonl"
    proc = subprocess.Popen(SLMKIT + ["serve", *names, "--port", str(port), "--decision-log", str(decisions), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(900):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the server did not start")
        out: dict = {}
        for role, name in models.items():
            q, by, t0 = [], [], time.perf_counter()
            for r in rows:
                resp = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                    "model": name, "messages": [{"role": "user", "content": r["prompt"]}], "max_tokens": MAX_TOKENS, "temperature": 0}).json()
                q.append(quality("rouge", resp["choices"][0]["message"]["content"], r["answer"]))
                by.append(((resp.get("slmkit") or {}).get("choices") or [{}])[0].get("answered_by"))
            res = {"rouge_l": sum(q) / len(q), "n": len(q), "seconds": round(time.perf_counter() - t0, 1)}
            if any(by):
                res["kept_on_student"] = sum(b == "small" for b in by) / len(by)
            out[role] = res
            print(role, name, res, flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait()


def card(name: str, env: dict[str, str]) -> dict:
    return json.loads(subprocess.run(SLMKIT + ["models", "show", name, "--json"], env=env, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True, help="the shared data folder (customer_support/ inside)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-recipes"))
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--flywheel-epochs", type=int, default=2)
    ap.add_argument("--fly-escalation", type=float, default=0.5, help="the share the flywheel's router escalates")
    ap.add_argument("--train-rows", type=int, default=1200, help="training chats (the teacher's top-k is cached for all of them first)")
    ap.add_argument("--dev", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--flywheel", type=int, default=200)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLMKIT_HOME": str(a.work / "home"), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    files = prepare(a.data, a.work, a)
    (a.work / "harvest.jsonl").touch()
    recipe = a.work / "route.yaml"
    recipe.write_text(recipe_text(a, flywheel=False))
    res: dict = {"cpu": cpu_line(), "settings": vars(a) | {"data": str(a.data), "work": str(a.work)}, "rows": {k: sum(1 for _ in p.open()) for k, p in files.items()}}
    t0 = time.perf_counter()
    res["round1_steps_s"] = run_recipe(recipe, env)
    heldout = [json.loads(x) for x in files["heldout"].read_text().splitlines()]
    res["round1_heldout"] = held_out({"teacher": BASE, "student": "bench-route-student", "routed": "bench-route-router"}, heldout, env)
    # the flywheel: the router answers prompts of the same kind with its escalation log on
    log = a.work / "escalations.jsonl"
    log.unlink(missing_ok=True)
    fly = [json.loads(x) for x in files["flywheel"].read_text().splitlines()]
    res["flywheel_serve"] = held_out({"routed": "bench-route-fly"}, fly, env, log=log)
    if log.is_file():  # made at the first escalation
        subprocess.run(SLMKIT + ["route", "harvest", str(log), "--out", str(a.work / "harvest.jsonl"), "--route", "bench-route-fly"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    res["harvested_rows"] = sum(1 for _ in (a.work / "harvest.jsonl").open()) if log.is_file() else 0
    routers = ["bench-route-router", "bench-route-fly"]
    if res["harvested_rows"] >= MIN_ROWS:  # something to learn from: the next student and its router
        recipe.write_text(recipe_text(a, flywheel=True))
        res["round2_steps_s"] = run_recipe(recipe, env)
        res["round2_heldout"] = held_out({"student": "bench-route-next", "routed": "bench-route-router2"}, heldout, env)
        routers.append("bench-route-router2")
    res["calibration"] = {n: {k: v for k, v in card(n, env)["settings"].items() if k in ("threshold", "escalated", "quality", "small_quality", "large_quality")}
                          for n in routers}
    res["training_s"] = {n: card(n, env)["settings"].get("seconds") for n in ("bench-route-student", "bench-route-next")
                         if n != "bench-route-next" or "round2_heldout" in res}  # from the cards
    res["total_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipes.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / "recipes.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    h1, h2 = res["round1_heldout"], res.get("round2_heldout")
    teacher = h1["teacher"]["rouge_l"]
    line = lambda label, r: (f"| {label} | {r['rouge_l']:.3f} | {r['rouge_l'] / teacher:.0%} | "  # noqa: E731
                             f"{'' if 'kept_on_student' not in r else format(r['kept_on_student'], '.0%')} |")
    steps = {**res["round1_steps_s"], **res.get("round2_steps_s", {})}
    out = ["# recipes: the route recipe on the customer-support set, and one flywheel round", "",
           f"CPU: {res['cpu']}. Rows: {res['rows']}. Teacher: {BASE}; student: its width-pruned half, distilled "
           f"({res['settings']['distill_steps']} steps x 8 x 256 tokens); routers: confidence (mean log-prob) at 95% of the teacher's "
           f"dev ROUGE-L. Held-out answers greedy, {MAX_TOKENS} tokens, ROUGE-L F1 against the reference answer.", "",
           "| held-out, before the flywheel | ROUGE-L | of the teacher's | kept on the student |", "|---|---|---|---|",
           line("teacher alone", h1["teacher"]), line("student alone", h1["student"]), line("routed pair", h1["routed"]), "",
           f"Flywheel: a second router over the same student, calibrated to escalate at most {res['settings']['fly_escalation']:.0%} "
           f"of the dev prompts (the best dev quality within that), answered {res['flywheel_serve']['routed']['n']} prompts of the same kind with its escalation log on "
           f"(kept {res['flywheel_serve']['routed'].get('kept_on_student', 0):.0%} on the student); `route harvest` made "
           f"{res['harvested_rows']} rows"
           + (f"; the next student = the student fine-tuned on them ({res['settings']['flywheel_epochs']} epochs), its router calibrated "
              "again on the same dev rows." if h2 else f": fewer than {MIN_ROWS}, so there is no next student (where the student answers "
              "better than the teacher, the best quality is reached escalating nothing, and nothing was escalated)."), "",
           *(["| held-out, after one round | ROUGE-L | of the teacher's | kept on the student |", "|---|---|---|---|",
              line("next student alone", h2["student"]), line("routed pair", h2["routed"]), ""] if h2 else []),
           "Calibration on the dev rows (ROUGE-L; escalated share at the threshold picked): " + "; ".join(
               f"{n.removeprefix('bench-route-')}: small {c['small_quality']:.3f}, large {c['large_quality']:.3f}, escalated {c['escalated']:.0%}, "
               f"served quality {c['quality']:.3f}" for n, c in res["calibration"].items()) + ".", "",
           "Wall time per step (seconds; round 2 reran only its new steps): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
           + f"; whole bench {res['total_s']:.0f} s (a step made by an earlier, stopped run of the bench is skipped and has no time here). "
           + "Training time from the cards: " + ", ".join(f"{k.removeprefix('bench-route-')} {v:.0f} s" for k, v in res["training_s"].items() if v) + ".", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
