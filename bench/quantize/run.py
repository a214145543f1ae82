"""Benchmark every quantization of the default model, both backends, one machine, one run.

For each variant: file size, bits per weight, WikiText-2 perplexity (same context, stride and tokens for all),
prefill and decode tokens/s, peak resident memory. Each measurement runs `slmkit eval` in its own process, so
the peak memory is that model's alone (speed and perplexity in separate processes).

    .venv/bin/python bench/quantize/run.py [--windows 16] [--home /tmp/slmkit-bench-home] [--data ../shared/data]

Writes bench/results/quantize.{json,md}. Targets (from the issue) are checked in the Markdown.
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

# (store name, backend, how it is made)
TORCH = [
    (BASE, "torch", None),
    (f"{BASE}-int8-rtn", "torch", ["quantize", BASE, "--scheme", "int8", "--no-ppl"]),
    (f"{BASE}-int8-gptq", "torch", ["quantize", BASE, "--scheme", "int8", "--method", "gptq", "--calib", "@CALIB", "--no-ppl"]),
    (f"{BASE}-int4-g32-rtn", "torch", ["quantize", BASE, "--scheme", "int4", "--group-size", "32", "--no-ppl"]),
    (f"{BASE}-int4-g32-gptq", "torch", ["quantize", BASE, "--scheme", "int4", "--group-size", "32", "--method", "gptq", "--calib", "@CALIB", "--no-ppl"]),
    (f"{BASE}-int4-g32-awq", "torch", ["quantize", BASE, "--scheme", "int4", "--group-size", "32", "--method", "awq", "--calib", "@CALIB", "--no-ppl"]),
]
GGUF = [(BASE, "llamacpp", None)] + [
    (f"{BASE}-{t.lower()}", "llamacpp", ["export", BASE, "--type", t, "--name", f"{BASE}-{t.lower()}", "--no-ppl"])
    for t in ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
] + [
    (f"{BASE}-{t.lower()}-imat", "llamacpp",
     ["export", BASE, "--type", t, "--imatrix", "@CALIB", "--name", f"{BASE}-{t.lower()}-imat", "--no-ppl"])
    for t in ("Q4_K_M", "Q4_0")
]


def measure(name: str, backend: str, env: dict[str, str], out: Path, windows: int) -> dict:
    ppl_file, speed_file = out / f"{name}-{backend}-ppl.json", out / f"{name}-{backend}-speed.json"
    sh(SLMKIT + ["eval", name, "--backend", backend, "--ppl", "wikitext2", "--limit", str(windows),
                 "--context-length", "1024", "--stride", "512", "--out", str(ppl_file)], env)
    sh(SLMKIT + ["eval", name, "--backend", backend, "--speed", "--out", str(speed_file)], env)
    ppl = json.loads(ppl_file.read_text())
    speed = json.loads(speed_file.read_text())["results"]["speed"]
    card = ppl["model"]["card"]
    size = speed["size_bytes"]
    imat = "+imatrix" if card["settings"].get("imatrix") else ""
    label = (card["settings"].get("type") or "") + imat or (
        "Q4_1 (packaged)" if backend == "llamacpp" else "fp32" if card["stage"] == "import" else name.removeprefix(BASE + "-"))
    return {
        "variant": label, "model": name, "backend": backend, "size_bytes": size,
        "bits_per_weight": 8 * size / card["parameters"],
        "perplexity": ppl["results"]["perplexity"]["perplexity"], "ppl_tokens": ppl["results"]["perplexity"]["tokens"],
        "prefill_tokens_per_s": speed["prefill_tokens_per_s"], "decode_tokens_per_s": speed["decode_tokens_per_s"],
        "peak_rss_mb": speed["peak_rss_mb"],
    }


def speed_ab(env: dict[str, str], out: Path, names: list[str], repeats: int) -> dict:
    """Decode tokens/s of two models measured alternately, so machine noise hits both alike; ratio of medians."""
    runs: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in names:
            f = out / f"{n}-ab{i}.json"
            sh(SLMKIT + ["eval", n, "--speed", "--out", str(f)], env)
            runs[n].append(round(json.loads(f.read_text())["results"]["speed"]["decode_tokens_per_s"], 2))
    med = {n: sorted(v)[len(v) // 2] for n, v in runs.items()}
    return {"runs": runs, "median": med, "ratio": med[names[1]] / med[names[0]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 1024 tokens (stride 512)")
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--ab-repeats", type=int, default=3, help="alternating fp32 / int8 speed runs for the decode ratio")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="the project's data folder (calibration text wikitext2/wiki.valid.tokens)")
    args = ap.parse_args()
    env = dict(os.environ, SLMKIT_HOME=args.home)
    data = args.data
    out = Path(args.home) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    sh(SLMKIT + ["models", "list"], env)  # imports the default into the bench store
    rows, made = [], {}
    for name, backend, make in TORCH + GGUF:
        existing = subprocess.run(SLMKIT + ["models", "show", name, "--json"], env=env, capture_output=True)
        if make and existing.returncode != 0:
            t = time.perf_counter()
            sh(SLMKIT + [a.replace("@CALIB", str(data / CALIB)) for a in make], env)
            made[name] = time.perf_counter() - t
        rows.append(measure(name, backend, env, out, args.windows))
        print(json.dumps(rows[-1]), flush=True)
    ab = speed_ab(env, out, [BASE, f"{BASE}-int8-rtn"], args.ab_repeats)
    print(json.dumps(ab), flush=True)
    fp32 = next(r for r in rows if r["backend"] == "torch" and r["variant"] == "fp32")
    f32 = next(r for r in rows if r["backend"] == "llamacpp" and r["variant"] == "F32")
    q4km = next(r for r in rows if r["variant"] == "Q4_K_M")
    q4km_imat = next(r for r in rows if r["variant"] == "Q4_K_M+imatrix")
    int8 = next(r for r in rows if r["variant"] == "int8-rtn")
    best4 = min((r for r in rows if r["backend"] == "torch" and r["variant"].startswith("int4")), key=lambda r: r["perplexity"])
    targets = {
        "int8_ppl_within_0.5pct": {"value_pct": 100 * (int8["perplexity"] / fp32["perplexity"] - 1), "met": int8["perplexity"] <= 1.005 * fp32["perplexity"]},
        "best_4bit_increase_vs_q4_k_m": {"ours": best4["variant"], "ours_increase": best4["perplexity"] - fp32["perplexity"],
                                          "q4_k_m_increase": q4km["perplexity"] - f32["perplexity"],
                                          "q4_k_m_imatrix_increase": q4km_imat["perplexity"] - f32["perplexity"],
                                          "met": best4["perplexity"] - fp32["perplexity"] <= q4km["perplexity"] - f32["perplexity"]},
        "int8_decode_2x_fp32": {"ratio": ab["ratio"], "table_ratio": int8["decode_tokens_per_s"] / fp32["decode_tokens_per_s"],
                                "met": ab["ratio"] >= 2},
    }
    result = {"benchmark": "quantize", "model": BASE, "windows": args.windows, "context_length": 1024, "stride": 512,
              "made_seconds": made, "rows": rows, "speed_ab": ab, "targets": targets}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# quantize ({BASE})", "",
          f"WikiText-2 test, first {args.windows} windows of 1024 tokens (stride 512), {rows[0]['ppl_tokens']} tokens, the same for every row. "
          "Speed: 256-token prompt, 64 greedy tokens, best of 2. Peak RSS: the `slmkit eval --speed` process. 2 cores.", "",
          "Note: the default model's float weights are themselves dequantized from its Q4_1 GGUF (blocks of 32, scale + minimum), "
          "so 4-bit schemes with groups of 32 land close to the same grid; on this model they lose less than they would on a model trained in float.", "",
          "| variant | backend | size MB | bits/weight | ppl | ppl vs its float | prefill tok/s | decode tok/s | peak RSS MB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = fp32 if r["backend"] == "torch" else f32
        md.append(f"| {r['variant']} | {r['backend']} | {r['size_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | {r['perplexity']:.4f} | "
                  f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    t = targets
    md += ["", "## Targets", "",
           f"- int8 perplexity within 0.5% of fp32: {t['int8_ppl_within_0.5pct']['value_pct']:+.3f}% -> {'met' if t['int8_ppl_within_0.5pct']['met'] else 'NOT met'}",
           f"- best 4-bit ({best4['variant']}) increase {t['best_4bit_increase_vs_q4_k_m']['ours_increase']:+.4f} vs Q4_K_M's {t['best_4bit_increase_vs_q4_k_m']['q4_k_m_increase']:+.4f} "
           f"-> {'met' if t['best_4bit_increase_vs_q4_k_m']['met'] else 'NOT met'} "
           f"(Q4_K_M with an importance matrix from wiki.valid: {t['best_4bit_increase_vs_q4_k_m']['q4_k_m_imatrix_increase']:+.4f})",
           f"- int8 decode {t['int8_decode_2x_fp32']['ratio']:.2f}x fp32 (target 2x) -> {'met' if t['int8_decode_2x_fp32']['met'] else 'NOT met'}: "
           f"medians of {args.ab_repeats} alternating `slmkit eval --speed` runs each, fp32 {ab['runs'][BASE]} vs int8 "
           f"{ab['runs'][BASE + '-int8-rtn']} tok/s (the table's single runs give {t['int8_decode_2x_fp32']['table_ratio']:.2f}x)", ""]
    (RESULTS / "quantize.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
