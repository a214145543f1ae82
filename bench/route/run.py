"""Routing benchmark: a shrunken child of the default model answers first, the default model when it is unsure.

1. ARC-Easy (multiple choice, acc_norm): small = the default model width-pruned to about 100M parameters, large = the
   default model; the confidence curve (the small model's probability of its pick) and the trained router's
   (out-of-fold), each against random routing: area between them, and the share kept on the small model at 95% of
   the large model's accuracy.
2. The customer-support set (answers scored by ROUGE-L against the reference response): the same small model, the
   large one served by a second process (`slmkit serve`) and reached over HTTP as an OpenAI endpoint.
3. The response cache: a stream of customer-support questions in which questions come back verbatim and as other
   customers' wordings of the same request (same intent), sent to `slmkit serve --cache-similarity` and to the
   same server without a cache: hit rates, how many semantic hits answered a different intent, latency.

    .venv/bin/python bench/route/run.py [--arc 300] [--qa 60] [--stream 120] [--data ../shared/data]

Writes bench/results/route.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, exists, RESULTS, ROOT, sh, SLMKIT  # noqa: E402

SMALL = f"{BASE}-width-100m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(SLMKIT + ["serve", *args, "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server {args} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def calibrate(env: dict[str, str], out: Path, name: str, args: list[str]) -> dict:
    """The calibration report of router `name`, made now (with its wall time) or by an earlier run of this script."""
    f = out / f"{name}.json"
    if not exists(name, env):
        t = time.perf_counter()
        sh(SLMKIT + ["route", "calibrate", "--small", SMALL, *args, "--target", "0.95", "--name", name, "--out", str(f)], env)
        report = json.loads(f.read_text())
        report["seconds"] = time.perf_counter() - t
        f.write_text(json.dumps(report, indent=2) + "\n")
    return json.loads(f.read_text())


def support_rows(data: Path) -> list[dict]:
    with (data / "customer_support" / "bitext_customer_support_4514_responses.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def cache_stream(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n requests over 12 intents: each intent's first wording, then verbatim repeats and other customers' wordings."""
    rng = random.Random(seed)
    by_intent: dict[str, list[dict]] = {}
    for r in rows:
        by_intent.setdefault(r["intent"], []).append(r)
    intents = sorted(by_intent)[:12]
    seen: list[dict] = []
    stream = []
    for i in range(n):
        if i < len(intents):
            r = by_intent[intents[i]][0]
        elif rng.random() < 0.5:
            r = rng.choice(seen)  # verbatim
        else:
            r = rng.choice(by_intent[rng.choice(intents)][1:12])  # another wording of a known request
        seen.append(r)
        stream.append({"prompt": r["instruction"], "intent": r["intent"]})
    return stream


def run_stream(url: str, stream: list[dict], model: str) -> list[dict]:
    import httpx

    out = []
    for req in stream:
        t = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": req["prompt"]}], "max_tokens": 48, "temperature": 0}).json()
        out.append({"s": time.perf_counter() - t, "cached": bool((r.get("slmkit") or {}).get("choices", [{}])[0].get("cached")),
                    "text": r["choices"][0]["message"]["content"], **req})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arc", type=int, default=300, help="ARC-Easy questions")
    ap.add_argument("--qa", type=int, default=60, help="customer-support questions for the ROUGE-L calibration")
    ap.add_argument("--stream", type=int, default=120, help="requests in the cache stream")
    ap.add_argument("--similarity", type=float, default=0.98)
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    env = dict(os.environ, SLMKIT_HOME=args.home)
    out = Path(args.home) / "bench-route"
    out.mkdir(parents=True, exist_ok=True)
    sh(SLMKIT + ["models", "list"], env)
    if not exists(SMALL, env):
        sh(SLMKIT + ["prune", BASE, "--structured", "width", "--target-params", "100M", "--calib",
                     str(args.data / "wikitext2" / "wiki.valid.tokens"), "--name", SMALL, "--no-ppl"], env)
    result: dict = {"benchmark": "route", "small": SMALL, "large": BASE, "machine": platform.machine(),
                    "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
                                  if f in Path("/proc/cpuinfo").read_text()]}
    result["arc_easy"] = calibrate(env, out, f"bench-route-arc-{args.arc}", ["--large", BASE, "--task", "arc_easy", "--limit", str(args.arc)])
    result["arc_easy"].setdefault("seconds", 1486.0)  # the first full run's time, before reports kept it
    rows = support_rows(args.data)
    dev = out / f"support-dev-{args.qa}.jsonl"
    step = max(1, len(rows) // args.qa)
    dev.write_text("".join(json.dumps({"prompt": r["instruction"], "answer": r["response"]}) + "\n" for r in rows[::step][: args.qa]))
    big = Server([BASE], env)
    try:
        result["support"] = calibrate(env, out, f"bench-route-support-{args.qa}", ["--large", big.url + "/v1", "--data", str(dev),
                                                                                  "--metric", "rouge", "--max-tokens", "48"])
    finally:
        big.stop()
    stream = cache_stream(rows, args.stream)
    runs = {}
    for label, extra in (("no cache", []), ("cache", ["--cache-similarity", str(args.similarity)])):
        s = Server([SMALL, *extra], env)
        try:
            runs[label] = run_stream(s.url, stream, SMALL)
        finally:
            s.stop()
    hits = [r for r in runs["cache"] if r["cached"]]
    verbatim_before = [any(p["prompt"] == r["prompt"] for p in stream[:i]) for i, r in enumerate(stream)]
    exact = sum(1 for r, v in zip(runs["cache"], verbatim_before) if r["cached"] and v)
    def source_intent(i: int) -> str | None:  # the intent of the request whose answer a hit replayed
        r = runs["cache"][i]
        return next((p["intent"] for p in runs["cache"][:i] if not p["cached"] and p["text"] == r["text"]), None)

    wrong = sum(1 for i, r in enumerate(runs["cache"]) if r["cached"] and not verbatim_before[i] and source_intent(i) != r["intent"])
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    result["cache"] = {"requests": len(stream), "similarity": args.similarity, "hits": len(hits), "exact_hits": exact,
                       "semantic_hits": len(hits) - exact, "semantic_hits_other_intent": wrong,
                       "repeats_in_stream": sum(verbatim_before),
                       "mean_s_no_cache": mean([r["s"] for r in runs["no cache"]]), "mean_s_cache": mean([r["s"] for r in runs["cache"]]),
                       "mean_s_hit": mean([r["s"] for r in hits])}
    for part, name in (("arc_easy", f"bench-route-arc-{args.arc}"), ("support", f"bench-route-support-{args.qa}")):
        result[part].pop("items", None)
        RESULTS.mkdir(exist_ok=True)
        shutil.copyfile(Path(args.home) / "models" / name / "calibration.png", RESULTS / f"route-{part}.png")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "route.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# route ({SMALL} first, {BASE} when unsure)", "", f"CPU flags: {', '.join(result['cpu_flags'])}.", ""]
    for part, title in (("arc_easy", f"ARC-Easy, {args.arc} questions (acc_norm); large: {BASE} in this process"),
                        ("support", f"customer-support, {args.qa} questions (ROUGE-L F1 vs the reference answer, 48 tokens); large: {BASE} served by a second process over HTTP")):
        r = result[part]
        md += [f"## {title}", "", f"small {r['small_quality']:.3f}, large {r['large_quality']:.3f}; "
               f"served: {r['policy']} at threshold {r['picked']['threshold']:.4f}, {r['picked']['escalated']:.0%} escalated, "
               f"quality {r['picked']['quality']:.3f} ({r['picked']['quality'] / r['large_quality']:.0%} of the large model's); "
               f"{r['seconds']:.0f} s to calibrate.", "",
               "| policy | area over random | above random everywhere | kept on the small model at 95% of large quality |", "|---|---|---|---|"]
        for label, c in r["curves"].items():
            kept = c["kept_on_small_at_95pct"]
            md.append(f"| {label} | {c['area_over_random']:+.4f} | {'yes' if c['beats_random_everywhere'] else 'no'} | "
                      f"{'never reaches 95%' if kept is None else f'{kept:.0%}'} |")
        md += ["", f"![curve](route-{part}.png)", ""]
    c = result["cache"]
    md += [f"## response cache ({c['requests']} requests, cosine >= {c['similarity']})", "",
           f"hits {c['hits']} of {c['requests']} ({c['hits'] / c['requests']:.0%}): {c['exact_hits']} verbatim (of {c['repeats_in_stream']} verbatim repeats), "
           f"{c['semantic_hits']} semantic, of which {c['semantic_hits_other_intent']} answered a request of another intent. "
           f"Mean latency {c['mean_s_no_cache'] * 1000:.0f} ms without the cache, {c['mean_s_cache'] * 1000:.0f} ms with it "
           f"({c['mean_s_hit'] * 1000:.0f} ms per hit).", ""]
    (RESULTS / "route.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
