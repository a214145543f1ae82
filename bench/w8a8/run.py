"""The W8A8 engine against llama.cpp's own C++ tools, on the default model, one machine, one run.

Measured in the same run:
- llama-bench (C++) pp512 and tg128 on the packaged Q4_1 GGUF and on a Q8_0 export (8.5 bits per weight: the same
  or fewer bytes than slmkit's int8 weights), with this machine's threads;
- slmkit's lean forward on the w8a8 child (SmoothQuant) and, for reference, the int8 weight-only child: batch-1
  decode tokens/s, a 16-row decode step, and a 512-token prefill;
- serving: 32 streamed requests of 128 tokens at 16 concurrent (and 1 stream) on llama-server (C++, `-np 16`,
  Q4_1) and on `slmkit serve` over the w8a8 child (PyTorch backend): aggregate tokens/s, TTFT, errors;
- WikiText-2 perplexity of float, w8a8 round-to-nearest and w8a8 SmoothQuant (`slmkit eval`, same windows).

llama.cpp's tools are built from the sources llama-cpp-python vendors, outside the package, with the CPU flags
slmkit's install uses (bench/llama_tools.py; `--native` for llama.cpp's -march=native, which dies on some AMX CPUs):

    BIN=$(.venv/bin/python bench/llama_tools.py --targets llama-server llama-bench)
    .venv/bin/python bench/w8a8/run.py --llama-cpp-bin $BIN [--home /tmp/slmkit-bench-home] [--data ../shared/data]

Writes bench/results/w8a8.{json,md} with `lscpu`'s model and flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))  # for common.py
from common import decode_speeds  # noqa: E402


def _serve_bench() -> Any:
    """bench/serve/run.py's helpers (servers, streams, levels), loaded by path: both scripts are named run.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "bench" / "serve" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sb = _serve_bench()
PROMPT, free_port, level, slmkit_cmd, start = _sb.PROMPT, _sb.free_port, _sb.level, _sb.slmkit_cmd, _sb.start

BASE = "smollm2-135m-instruct"
SQ, RTN, INT8 = f"{BASE}-w8a8-smoothquant", f"{BASE}-w8a8-rtn", f"{BASE}-int8-rtn"
SLMKIT = [sys.executable, "-m", "slmkit"]


def sh(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def cpu() -> dict:
    text = sh(["lscpu"])
    field = lambda k: next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(k)), "")  # noqa: E731
    flags = field("Flags").split()
    return {"model": field("Model name"), "cpus": field("CPU(s)"),
            "flags": [f for f in flags if re.match(r"avx|amx|fma|f16c|vnni", f)]}


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict:
    out = json.loads(sh([str(binary), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"]))
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in out}


def lean_forward(name: str) -> dict:
    """Batch-1 decode, a 16-row step and a 512-token prefill through slmkit's lean forward (in this process)."""
    import torch

    import slmkit
    from slmkit.engine.lean_forward import LeanForward

    from slmkit.layers.integer import Int8Linear

    m = slmkit.load(name)
    fast = LeanForward(m.backend.model)
    prompt = torch.tensor([m.backend.encode(PROMPT)])
    # what a decode token reads per weight of its linears (output head included): int8 + a scale per row
    linears = [mod for mod in m.backend.model.modules() if isinstance(mod, Int8Linear)]
    weights = sum(mod.weight.numel() for mod in linears)
    res = {"read_bits_per_weight": 8 * sum(mod.weight.numel() + mod.scales.numel() * mod.scales.element_size() for mod in linears) / max(weights, 1)}
    return res | decode_speeds(fast, prompt[0].tolist())


def step_breakdown(name: str, rows_list: tuple[int, ...] = (1, 16), context: int = 150) -> dict:
    """Where a decode step's time goes, by ablation (medians of 5 x 16 steps at `context` cached tokens per row):
    the step as it runs (in one call of slmkit's decode_step where built); then, on the Python blocks, the whole step; without attention (torch's SDPA and slmkit's rotary + attention kernel return their queries); with the integer matmuls alone (each W8A8
    layer runs its chosen kernel on a ready int8 input, int32 results made float: no activation quantization, no
    scaling; slmkit's native kernel, which does both inside, on zeros); without the W8A8
    layers at all. attention = full - no attention; quantize + scale = full - matmuls alone; matmuls = matmuls alone -
    no linears; the rest (embedding, norms, rotary, cache writes, masks, Python) = no linears - attention."""
    import torch
    import torch.nn.functional as F

    import slmkit
    from slmkit.engine.lean_forward import LeanForward
    from slmkit.layers import integer

    m = slmkit.load(name)
    fast = LeanForward(m.backend.model)
    prompt = torch.tensor([m.backend.encode(PROMPT)])
    real_forward, real_sdpa = integer.W8A8Linear.forward, F.scaled_dot_product_attention

    def matmul_only(layer: Any, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, layer.in_features).shape[0]
        kernel = layer._kernels[integer.bucket_of(rows)]
        if kernel == "native":  # slmkit's kernel quantizes and scales inside: only its input is made ready (zeros)
            y = layer._native(torch.zeros(rows, layer.in_features), *layer._native_args)
        elif kernel == "onednn":
            y = integer._onednn_mm(torch.full((rows, layer.in_features), 128, dtype=torch.uint8), layer._packed, layer.scales, layer._zeros)
        else:
            y = torch._int_mm(torch.zeros((rows, layer.in_features), dtype=torch.int8), layer.weight.t()).float()
        return y.reshape(*x.shape[:-1], layer.out_features)

    zeros: dict = {}

    def no_linear(layer: Any, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[:-1]), layer.out_features)
        return zeros.setdefault(key, torch.zeros(*key[0], layer.out_features))

    real_kernels = fast.kernels  # slmkit's decode-step kernels (slmkit/native), when built
    width = fast.heads * fast.head_dim

    def no_attention(q: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return q

    def no_rope_attention(qkv: torch.Tensor, *args: Any) -> torch.Tensor:  # the queries, as they came
        return qkv[:, :width]

    kernels_without_attention = None if real_kernels is None else SimpleNamespace(**{**vars(real_kernels), "rope_decode_attention": no_rope_attention})
    whole = fast.step_weights  # the one-call step (native.decode_step); the ablations run the Python blocks
    variants = {"one call": (real_forward, real_sdpa, real_kernels, whole), "full": (real_forward, real_sdpa, real_kernels, None),
                "no attention": (real_forward, no_attention, kernels_without_attention, None),
                "matmuls alone": (matmul_only, real_sdpa, real_kernels, None), "no linears": (no_linear, real_sdpa, real_kernels, None)}
    out = {}
    for rows in rows_list:
        cache = fast.new_cache(rows, 512)
        for r in range(rows):
            fast.forward(cache, prompt, first=r)
        tok = torch.full((rows, 1), 42)
        ms: dict[str, float] = {}
        for label, (forward, sdpa, kernels, step) in variants.items():
            integer.W8A8Linear.forward, F.scaled_dot_product_attention, fast.kernels, fast.step_weights = forward, sdpa, kernels, step
            try:
                times = []
                for _ in range(6):
                    cache.lens[:rows] = [context] * rows
                    t0 = time.perf_counter()
                    for _ in range(16):
                        fast.forward(cache, tok)
                    times.append((time.perf_counter() - t0) / 16 * 1e3)
                ms[label] = sorted(times[1:])[2]  # the first round warms up
            finally:
                integer.W8A8Linear.forward, F.scaled_dot_product_attention, fast.kernels = real_forward, real_sdpa, real_kernels
                fast.step_weights = whole
        out[str(rows)] = {"one_call_ms": ms["one call"] if whole is not None else None, "step_ms": ms["full"], "attention_ms": ms["full"] - ms["no attention"],
                          "matmuls_ms": ms["matmuls alone"] - ms["no linears"], "quantize_scale_ms": ms["full"] - ms["matmuls alone"],
                          "rest_ms": ms["no linears"] - (ms["full"] - ms["no attention"]), "raw_ms": ms}
    return out


def perplexity(name: str, data: Path, windows: int) -> float:
    out = Path(f"/tmp/w8a8-ppl-{name}.json")
    subprocess.run([*SLMKIT, "eval", name, "--ppl", "wikitext2", "--limit", str(windows), "--context-length", "512",
                    "--stride", "256", "--data-dir", str(data), "--out", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())["results"]["perplexity"]["perplexity"]


def serve(binary: Path, q41: Path, threads: int, levels: list[int]) -> list[dict]:
    runs = [("llama-server (C++) Q4_1 -np 16", [str(binary), "-m", str(q41), "-t", str(threads), "-c", "8192", "-np", "16",
                                                "--host", "127.0.0.1", "--port", str(free_port()), "-a", BASE], BASE),
            ("slmkit serve w8a8 (torch)", slmkit_cmd(SQ, free_port(), "torch"), SQ)]
    for _, cmd, _ in runs:
        if "--max-batch" in cmd:
            cmd[cmd.index("--max-batch") + 1] = "16"
    return take_turns(runs, levels)


def take_turns(runs: list[tuple[str, list[str], str]], levels: list[int]) -> list[dict]:
    """Start every server of `runs` (label, command, model name), then at each level let each take its turn: servers
    compared at a level are measured minutes apart, not half an hour."""
    out = []
    procs = []
    try:
        for label, cmd, model in runs:
            url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
            procs.append(start(cmd, url, dict(os.environ), model))
            out.append({"label": label, "levels": [], "url": url, "model": model})
        for n in levels:
            for res in out:
                requests = 2 * n if n > 1 else 4
                r = asyncio.run(batch_of(res["url"], res["model"], n, requests))
                res["levels"].append(r)
                print(res["label"], json.dumps(r), flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
    return out


async def batch_of(url: str, model: str, concurrent: int, requests: int) -> dict:
    """`requests` streams of 128 tokens, `concurrent` at a time (two waves at 16), summed."""
    waves = [await level(url, model, concurrent, 128) for _ in range(max(1, requests // concurrent))]
    tokens, wall = sum(w["tokens"] for w in waves), sum(w["wall_s"] for w in waves)
    return {"streams": concurrent, "requests": concurrent * len(waves), "errors": sum(w["errors"] for w in waves),
            "tokens_per_s": tokens / wall, "ttft_p50": sorted(w["ttft_p50"] for w in waves)[len(waves) // 2],
            "itl_p50": sorted(w["itl_p50"] for w in waves)[len(waves) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp-bin", type=Path, required=True, help="folder with llama-server and llama-bench")
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    os.environ["SLMKIT_HOME"] = args.home
    threads = os.cpu_count() or 2
    from slmkit.sources.importer import ensure_default
    from slmkit.store import Store

    ensure_default()
    store = Store()
    for name, cmd in ((SQ, ["--scheme", "w8a8", "--method", "smoothquant"]), (RTN, ["--scheme", "w8a8"]), (INT8, ["--scheme", "int8"])):
        if not store.exists(name):
            subprocess.run([*SLMKIT, "quantize", BASE, *cmd, "--name", name, "--no-ppl"], check=True)
    q80 = f"{BASE}-q8_0"
    if not store.exists(q80):
        subprocess.run([*SLMKIT, "export", BASE, "--type", "Q8_0", "--name", q80, "--no-ppl"], check=True)
    q41, q80_file = store.path(BASE) / "model.gguf", next(store.path(q80).glob("*.gguf"))
    result: dict = {"benchmark": "w8a8", "model": BASE, "cpu": cpu(), "threads": threads}
    result["llama_bench"] = {"Q4_1": llama_bench(args.llama_cpp_bin / "llama-bench", q41, threads),
                             "Q8_0": llama_bench(args.llama_cpp_bin / "llama-bench", q80_file, threads)}
    print("llama-bench", result["llama_bench"], flush=True)
    result["lean_forward"] = {name: lean_forward(name) for name in (SQ, INT8)}
    print("lean forward", result["lean_forward"], flush=True)
    from slmkit.layers.integer import kernel_choices

    result["kernels"] = kernel_choices()
    result["step_breakdown"] = step_breakdown(SQ)
    print("step breakdown", result["step_breakdown"], flush=True)
    result["serve"] = serve(args.llama_cpp_bin / "llama-server", q41, threads, args.levels)
    result["perplexity"] = {name: perplexity(name, args.data, args.windows) for name in (BASE, RTN, SQ)}
    print("perplexity", result["perplexity"], flush=True)
    result["bits_per_weight"] = {"w8a8": 8 * (store.card(SQ).weights_bytes["safetensors"]) / store.card(SQ).parameters,
                                 "Q8_0": 8 * q80_file.stat().st_size / store.card(SQ).parameters,
                                 "Q4_1": 8 * q41.stat().st_size / store.card(SQ).parameters}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "w8a8.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "w8a8.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    lb, lf, ppl = r["llama_bench"], r["lean_forward"], r["perplexity"]
    sq = lf[SQ]
    md = [f"# W8A8 engine vs llama.cpp ({r['model']})", "",
          f"CPU: {r['cpu']['model']}, {r['cpu']['cpus']} CPUs, flags {' '.join(r['cpu']['flags'])}; {r['threads']} threads everywhere.", "",
          "## Kernels (batch 1 and prefill)", "",
          "| engine | file bits/weight | bits/weight a decode token reads | decode tok/s (batch 1) | 16-row decode tok/s | prefill 512 tok/s |",
          "|---|---|---|---|---|---|",
          f"| llama-bench Q4_1 | {r['bits_per_weight']['Q4_1']:.2f} | {r['bits_per_weight']['Q4_1']:.2f} | {lb['Q4_1']['tg128']:.1f} | - | {lb['Q4_1']['pp512']:.1f} |",
          f"| llama-bench Q8_0 | {r['bits_per_weight']['Q8_0']:.2f} | {r['bits_per_weight']['Q8_0']:.2f} | {lb['Q8_0']['tg128']:.1f} | - | {lb['Q8_0']['pp512']:.1f} |",
          f"| slmkit w8a8 (SmoothQuant) | {r['bits_per_weight']['w8a8']:.2f} | {sq.get('read_bits_per_weight', float('nan')):.2f} | {sq['decode_1_tok_s']:.1f} | {sq['decode_16_tok_s']:.1f} | {sq['prefill_512_tok_s']:.1f} |",
          f"| slmkit int8 weight-only | - | {lf[INT8].get('read_bits_per_weight', float('nan')):.2f} | {lf[INT8]['decode_1_tok_s']:.1f} | {lf[INT8]['decode_16_tok_s']:.1f} | {lf[INT8]['prefill_512_tok_s']:.1f} |",
          "", "The w8a8 file also stores the bf16 token-embedding table apart from its int8 output head (the standard "
          "compressed-tensors layout has no int8 embedding): a decode token reads one row of it.",
          "", "Kernels chosen per weight shape (rows 1-3, 4-31, 32+): " + "; ".join(f"{k} {'/'.join(v)}" for k, v in r["kernels"].items()),
          "", "## Serving (streamed /v1/completions, ~128 prompt tokens, 128 new tokens, temperature 0.7)", "",
          "| server | concurrent | requests | errors | tokens/s | TTFT p50 s | ITL p50 ms |", "|---|---|---|---|---|---|---|"]
    for run in r["serve"]:
        for x in run["levels"]:
            md.append(f"| {run['label']} | {x['streams']} | {x['requests']} | {x['errors']} | {x['tokens_per_s']:.1f} | "
                      f"{x['ttft_p50']:.2f} | {1000 * x['itl_p50']:.1f} |")
    at = lambda i, n: next((x for x in r["serve"][i]["levels"] if x["streams"] == n), None)  # noqa: E731
    if "step_breakdown" in r:
        md += ["", "## Where a w8a8 decode step's time goes (ablation, 150 cached tokens per row)", "",
               "The step as it runs is one call of slmkit's decode_step; the ablation swaps parts of the Python blocks "
               "(the same kernels, called one by one). Where slmkit's int8 kernel runs a layer, its activation "
               "quantization and scaling are inside it and counted with the matmuls (the quantize + scale column is "
               "then only noise).", "",
               "| rows | step ms (one call) | step ms (Python blocks) | integer matmuls | activation quantize + scale | attention | the rest (norms, rotary, cache writes, Python) |",
               "|---|---|---|---|---|---|---|"]
        for rows, b in r["step_breakdown"].items():
            one = "-" if b.get("one_call_ms") is None else f"{b['one_call_ms']:.1f}"
            md.append(f"| {rows} | {one} | {b['step_ms']:.1f} | {b['matmuls_ms']:.1f} | {b['quantize_scale_ms']:.1f} | {b['attention_ms']:.1f} | {b['rest_ms']:.1f} |")
    md += ["", "## WikiText-2 perplexity (same windows)", "", "| model | perplexity | vs float |", "|---|---|---|"]
    for name, v in ppl.items():
        md.append(f"| {name} | {v:.3f} | {100 * (v / ppl[BASE] - 1):+.2f}% |")
    md += ["", "## Targets", ""]
    if at(0, 16) and at(1, 16):
        md.append(f"- 16 streams: {at(1, 16)['tokens_per_s'] / at(0, 16)['tokens_per_s']:.2f}x llama-server's aggregate "
                  f"(target 3x), errors {at(1, 16)['errors']} (llama-server {at(0, 16)['errors']}), TTFT p50 {at(1, 16)['ttft_p50']:.2f} s (target < 0.3 s)")
    md.append(f"- batch-1 decode: {sq['decode_1_tok_s'] / lb['Q8_0']['tg128']:.2f}x llama-bench tg128 at Q8_0 (same or fewer bytes per weight: target >= 1)")
    md.append(f"- prefill 512: {sq['prefill_512_tok_s'] / lb['Q4_1']['pp512']:.2f}x llama-bench pp512 on Q4_1, "
              f"{sq['prefill_512_tok_s'] / lb['Q8_0']['pp512']:.2f}x on Q8_0 (target 2x)")
    md.append(f"- perplexity: w8a8 rtn {100 * (ppl[RTN] / ppl[BASE] - 1):+.2f}%, SmoothQuant {100 * (ppl[SQ] / ppl[BASE] - 1):+.2f}% (target within 1%)")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
