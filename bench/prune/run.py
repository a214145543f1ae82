"""Benchmark pruning (and low-rank factorization) of the default model, one machine, one run.

Rows: dense; magnitude, Wanda and SparseGPT at 50% and at 2:4; depth pruning of 10, 20 and 30% of the blocks;
width pruning to about 100M and 70M parameters; low-rank at 80% and 60% of the parameters (when `slmkit lowrank`
exists). Columns: parameters, bytes on disk, WikiText-2 perplexity (the same tokens for every row), ARC-Easy
acc_norm, decode tokens/s in slmkit (PyTorch) and, for the dense rows (the float parent and the structured
children), in llama.cpp on an F16 export. Each measurement runs `slmkit eval` in its own process.
Calibration: wikitext2/wiki.valid.tokens from the data folder (never the test text that is scored).

    .venv/bin/python bench/prune/run.py [--windows 16] [--arc 300] [--home /tmp/slmkit-bench-home] [--data ../shared/data]

Writes bench/results/prune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, RESULTS, ROOT, sh, SLMKIT  # noqa: E402

CALIB = "wikitext2/wiki.valid.tokens"

# (label, store name, command that makes it, dense: also measured on llama.cpp)
VARIANTS = [
    ("dense", BASE, None, True),
    *[(f"{m} 50%", f"{BASE}-{m}-50pct", ["prune", BASE, "--method", m, "--sparsity", "0.5", "--calib", "@CALIB"], False)
      for m in ("magnitude", "wanda", "sparsegpt")],
    *[(f"{m} 2:4", f"{BASE}-{m}-2of4", ["prune", BASE, "--method", m, "--pattern", "2:4", "--calib", "@CALIB"], False)
      for m in ("magnitude", "wanda", "sparsegpt")],
    *[(f"depth -{p}% blocks", f"{BASE}-depth-{p}", ["prune", BASE, "--structured", "depth", "--blocks", str(30 * p // 100), "--calib", "@CALIB"], True)
      for p in (10, 20, 30)],
    *[(f"width {t}", f"{BASE}-width-{t.lower()}", ["prune", BASE, "--structured", "width", "--target-params", t, "--calib", "@CALIB"], True)
      for t in ("100M", "70M")],
    *[(f"low-rank {int(r * 100)}%", f"{BASE}-lowrank-{int(r * 100)}", ["lowrank", BASE, "--ratio", str(r), "--calib", "@CALIB"], False)
      for r in (0.8, 0.6)],
]


def ev(name: str, args: list[str], env: dict[str, str], out: Path, tag: str) -> dict:
    f = out / f"{name}-{tag}.json"
    sh(SLMKIT + ["eval", name, *args, "--out", str(f)], env)
    return json.loads(f.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 1024 tokens (stride 512)")
    ap.add_argument("--arc", type=int, default=300, help="ARC-Easy questions")
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure decode speed of every row already in prune.json (both engines, interleaved rows), "
                         "on an otherwise idle machine")
    ap.add_argument("--speed-repeats", type=int, default=2, help="--speed-only: runs per row; the best counts")
    ap.add_argument("--skip-speed", action="store_true", help="quality only (run --speed-only afterwards on an idle machine)")
    args = ap.parse_args()
    env = dict(os.environ, SLMKIT_HOME=args.home)
    out = Path(args.home) / "bench-prune"
    out.mkdir(parents=True, exist_ok=True)
    sh(SLMKIT + ["models", "list"], env)
    has_lowrank = subprocess.run(SLMKIT + ["lowrank", "--help"], env=env, capture_output=True).returncode == 0
    previous = {r["label"]: r for r in json.loads((RESULTS / "prune.json").read_text())["rows"]} if (RESULTS / "prune.json").is_file() else {}
    if args.speed_only:
        rows = list(previous.values())
        for rep in range(args.speed_repeats):
            for r in rows:
                if args.only and r["label"] not in args.only:
                    continue
                tps = ev(r["model"], ["--speed"], env, out, f"speed{rep}")["results"]["speed"]["decode_tokens_per_s"]
                r["decode_tps"] = tps if rep == 0 else max(r["decode_tps"], tps)
                if r.get("llamacpp_f16"):
                    f16 = f"{r['model']}-f16"
                    if subprocess.run(SLMKIT + ["models", "show", f16, "--json"], env=env, capture_output=True).returncode != 0:
                        sh(SLMKIT + ["export", r["model"], "--type", "F16", "--name", f16, "--no-ppl"], env)
                    lc = ev(f"{r['model']}-f16", ["--backend", "llamacpp", "--speed"], env, out, f"speed{rep}")["results"]["speed"]["decode_tokens_per_s"]
                    r["decode_tps_llamacpp"] = lc if rep == 0 else max(r["decode_tps_llamacpp"] or 0, lc)
                print(r["label"], r["decode_tps"], r.get("decode_tps_llamacpp"), flush=True)
        write(rows, args)
        return
    rows = []
    for label, name, make, dense in VARIANTS:
        if args.only and label not in args.only:
            if label in previous:
                rows.append(previous[label])
            continue
        if make and make[0] == "lowrank" and not has_lowrank:
            continue
        made_s = None
        if make and subprocess.run(SLMKIT + ["models", "show", name, "--json"], env=env, capture_output=True).returncode != 0:
            cmd = [a.replace("@CALIB", str(args.data / CALIB)) for a in make]
            t = time.perf_counter()
            sh(SLMKIT + cmd + ["--name", name, "--no-ppl"], env)
            made_s = time.perf_counter() - t
        text = str(args.data / "wikitext2" / "wiki.test.raw")
        ppl = ev(name, ["--ppl", text, "--limit", str(args.windows), "--context-length", "1024", "--stride", "512"], env, out, "ppl")
        arc = ev(name, ["--task", "arc_easy", "--limit", str(args.arc)], env, out, "arc")
        speed = None if args.skip_speed else ev(name, ["--speed"], env, out, "speed")
        card = ppl["model"]["card"]
        row = {
            "label": label, "model": name, "parameters": card["parameters"],
            "bytes": card["weights_bytes"].get("safetensors") or card["size_bytes"],
            "perplexity": ppl["results"]["perplexity"]["perplexity"], "ppl_tokens": ppl["results"]["perplexity"]["tokens"],
            "sparsity": (ppl["results"].get("sparsity") or {}).get("linear_sparsity", 0.0),
            "arc_easy_acc_norm": arc["results"]["tasks"]["arc_easy"]["acc_norm"],
            "arc_easy_stderr": arc["results"]["tasks"]["arc_easy"]["acc_norm_stderr"],
            "arc_n": arc["results"]["tasks"]["arc_easy"]["n"],
            "decode_tps": speed["results"]["speed"]["decode_tokens_per_s"] if speed else None, "made_seconds": made_s,
            "decode_tps_llamacpp": None, "llamacpp_f16": dense,
        }
        if dense and not args.skip_speed:
            f16 = f"{name}-f16"
            if subprocess.run(SLMKIT + ["models", "show", f16, "--json"], env=env, capture_output=True).returncode != 0:
                sh(SLMKIT + ["export", name, "--type", "F16", "--name", f16, "--no-ppl"], env)
            row["decode_tps_llamacpp"] = ev(f16, ["--backend", "llamacpp", "--speed"], env, out, "speed")["results"]["speed"]["decode_tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args)  # after every row: a stopped run keeps what it measured


def write(rows: list[dict], args: argparse.Namespace) -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("Flags")), [])
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    result = {"benchmark": "prune", "model": BASE, "windows": args.windows, "arc_questions": args.arc,
              "cpu": model_name + "; " + " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags),
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune.json").write_text(json.dumps(result, indent=2) + "\n")
    dense = rows[0]
    by = {r["label"]: r for r in rows}
    md = [f"# prune ({BASE})", "",
          f"WikiText-2 test, first {args.windows} windows of 1024 tokens (stride 512), {dense['ppl_tokens']} tokens, the same for every row; "
          f"ARC-Easy acc_norm on the first {args.arc} questions (stderr about {100 * dense['arc_easy_stderr']:.1f} points: differences "
          "below about twice that are noise). Calibration: 32 windows of 512 tokens of wiki.valid.tokens. Decode: 64 greedy tokens after a "
          f"256-token prompt, best of 2; llama.cpp on an F16 export. CPU: {result['cpu']}; 2 threads.", "",
          "Unstructured and 2:4 children are stored dense (zeros in float weights): the same size and speed as the parent. "
          "The default model's float weights are dequantized from its Q4_1 GGUF (each block of 32 weights shares a scale and a "
          "minimum), so its magnitudes sit on a 4-bit grid; how that shifts magnitude-based ranking against a model trained in "
          "float is not measured here.", "",
          "| variant | params | MB on disk | sparsity | ppl | ppl vs dense | ARC-Easy acc_norm | decode tok/s (slmkit) | decode tok/s (llama.cpp F16) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lc = f"{r['decode_tps_llamacpp']:.1f}" if r["decode_tps_llamacpp"] else "-"
        tps = f"{r['decode_tps']:.1f}" if r["decode_tps"] else "-"
        md.append(f"| {r['label']} | {r['parameters'] / 1e6:.1f}M | {r['bytes'] / 1e6:.1f} | {r['sparsity']:.1%} | {r['perplexity']:.3f} | "
                  f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}% | {r['arc_easy_acc_norm']:.3f} | {tps} | {lc} |")
    md += ["", "## Targets", ""]
    for kind in ("50%", "2:4"):
        mag, wan, sgpt = (by.get(f"{m} {kind}") for m in ("magnitude", "wanda", "sparsegpt"))
        if mag and wan and sgpt:
            inc = lambda r: r["perplexity"] - dense["perplexity"]  # noqa: E731
            md.append(f"- {kind}: perplexity increase magnitude {inc(mag):+.2f}, Wanda {inc(wan):+.2f}, SparseGPT {inc(sgpt):+.2f}: "
                      f"magnitude / Wanda = {inc(mag) / inc(wan):.2f}x, magnitude / SparseGPT = {inc(mag) / inc(sgpt):.2f}x "
                      "(on LLaMA-7B magnitude is about 2x Wanda)")
    for r in rows:
        if r["label"].startswith(("depth", "width", "low-rank")) and r["decode_tps"] and dense["decode_tps"]:
            share = r["parameters"] / dense["parameters"]
            sp = dense["decode_tps"] / r["decode_tps"]
            lc = (dense["decode_tps_llamacpp"] / r["decode_tps_llamacpp"]) if r["decode_tps_llamacpp"] and dense["decode_tps_llamacpp"] else None
            md.append(f"- {r['label']}: {share:.0%} of the parameters; time per decoded token {sp:.0%} of dense's in slmkit"
                      + (f", {lc:.0%} in llama.cpp" if lc else ""))
    (RESULTS / "prune.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
