"""Serving benchmark over real sockets on 127.0.0.1: slmkit serve vs llama-cpp-python's server, same run.

Each level sends N concurrent streams of ~128 prompt tokens asking for 128 tokens (streamed /v1/completions),
and records aggregate output tokens/s, time to first token and inter-token latency (p50, p99), and errors.
Then a soak: a steady load on slmkit for --soak-seconds while the server's resident memory is sampled.

    .venv/bin/pip install -c constraints.txt -e '.[dev]'
    .venv/bin/python bench/serve/run.py [--levels 1 4 8 16 32] [--soak-seconds 600] [--no-f16]

Servers (all started first, then each level runs on each server in turn): slmkit on PyTorch (float32) and on llama.cpp (the packaged Q4_1 GGUF), llama-cpp-python's
server on the same Q4_1 file, then both on an F16 export of the same weights (made once, as MODEL-f16 in the store).
Writes bench/results/serve.{json,md}. Every server gets this machine's cores as threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common.py
from common import RESULTS, ROOT  # noqa: E402

PROMPT = (
    "The lighthouse stood at the edge of the northern cliffs, where the sea met the land in a long line of white foam. "
    "Every evening the keeper climbed the spiral stairs, trimmed the wick, and watched the beam sweep across the water. "
    "Ships passing in the night counted the flashes to learn where they were, and the keeper counted the ships. "
    "One winter a storm came that lasted nine days, and on the third night a small boat appeared below the rocks. "
)  # about 128 tokens with the SmolLM2 tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict[str, str], model: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                # warm-up: load the model and run one request before anything is timed
                httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4}, timeout=600)
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(cmd)}")
        time.sleep(0.5)
    raise RuntimeError("server did not start")


async def one_stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, seed: int,
                     temperature: float = 0.7) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.perf_counter())
                    text.append(ev["choices"][0]["text"])
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    if not times:
        return {"error": "no tokens"}
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": len(times), "end": times[-1],
            "text": "".join(text)}


async def level(url: str, model: str, streams: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4)) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(client, url, model, max_tokens, i) for i in range(streams)))
        wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    itl = sorted(x for r in ok for x in r["itl"])
    ttft = sorted(r["ttft"] for r in ok)
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
    return {"streams": streams, "errors": len(res) - len(ok), "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


async def soak(url: str, model: str, pid: int, seconds: float, streams: int) -> dict:
    proc = psutil.Process(pid)
    samples: list[tuple[float, float]] = []
    errors = 0
    done = 0
    t0 = time.perf_counter()

    async def worker(i: int) -> None:
        nonlocal errors, done
        async with httpx.AsyncClient() as client:
            while time.perf_counter() - t0 < seconds:
                r = await one_stream(client, url, model, 64, i + done)
                errors += "error" in r
                done += 1

    async def sampler() -> None:
        while time.perf_counter() - t0 < seconds:
            samples.append((time.perf_counter() - t0, proc.memory_info().rss / 1e6))
            await asyncio.sleep(5)

    await asyncio.gather(sampler(), *(worker(i) for i in range(streams)))
    first = [m for t, m in samples if t <= seconds * 0.2] or [samples[0][1]]
    last = [m for t, m in samples if t >= seconds * 0.8] or [samples[-1][1]]
    return {"seconds": seconds, "streams": streams, "requests": done, "errors": errors, "rss_mb_start": statistics.mean(first),
            "rss_mb_end": statistics.mean(last), "rss_growth_pct": 100 * (statistics.mean(last) / statistics.mean(first) - 1),
            "samples": samples}


def slmkit_cmd(model: str, port: int, backend: str) -> list[str]:
    return [sys.executable, "-m", "slmkit", "serve", model, "--port", str(port), "--backend", backend, "--max-batch", "32",
            "--max-queue", "128", "--max-tokens", "512"]


def llama_server_cmd(gguf: Path, alias: str, port: int) -> list[str]:
    # by default it aborts a running stream when another request arrives; queue them instead
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(os.cpu_count() or 2),
            "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port), "--model_alias", alias,
            "--interrupt_requests", "False"]


def f16_export(name: str) -> tuple[str, Path]:
    """The default model's weights as an F16 GGUF in the store (made once): a format whose batched kernels
    are efficient on AVX2, unlike Q4_1's."""
    from slmkit.export.store_export import export_model
    from slmkit.store import Store

    f16 = f"{name}-f16"
    if not Store().exists(f16):
        export_model(name, gguf_type="F16", store_as=f16)
    return f16, next(Store().path(f16).glob("*.gguf"))


def run_all(runs: list[tuple[str, list[str], str, bool]], levels: list[int], max_tokens: int, soak_s: float, soak_streams: int) -> list[dict]:
    """Start every server, then run each level on each server in turn, so that servers compared at a level are
    measured minutes apart, not half an hour (this machine's speed drifts by +-25%); the soaks come last.
    An idle server uses no CPU."""
    procs, out = [], []
    try:
        for label, cmd, model, _ in runs:
            url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
            procs.append((start(cmd, url, dict(os.environ), model), url))
            out.append({"label": label, "model": model, "levels": []})
        for n in levels:
            for (label, _, model, _), (_, url), res in zip(runs, procs, out):
                res["levels"].append(asyncio.run(level(url, model, n, max_tokens)))
                print(label, json.dumps(res["levels"][-1]), flush=True)
        for (label, _, model, soaks), (proc, url), res in zip(runs, procs, out):
            if soaks and soak_s > 0:
                res["soak"] = asyncio.run(soak(url, model, proc.pid, soak_s, soak_streams))
                print(label, "soak", json.dumps({k: v for k, v in res["soak"].items() if k != "samples"}), flush=True)
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--soak-seconds", type=float, default=600, help="per slmkit engine (PyTorch and llama.cpp)")
    ap.add_argument("--soak-streams", type=int, default=8)
    ap.add_argument("--no-f16", action="store_true", help="skip the F16 GGUF pair")
    ap.add_argument("--name", default="serve", help="results file stem (bench/results/NAME.{json,md}); a partial run "
                                                     "under another name leaves the full results in place")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from slmkit.sources.importer import ensure_default
    from slmkit.store import Store

    name = ensure_default()
    q41 = Store().path(name) / "model.gguf"  # the packaged Q4_1 file
    # (label, command, model name the server answers to, soak?)
    runs = [
        ("slmkit torch fp32", slmkit_cmd(name, free_port(), "torch"), name, True),
        ("slmkit llama.cpp Q4_1", slmkit_cmd(name, free_port(), "llamacpp"), name, True),
        ("llama_cpp.server Q4_1", llama_server_cmd(q41, name, free_port()), name, False),
    ]
    if not args.no_f16:
        f16, f16_gguf = f16_export(name)
        runs += [("slmkit llama.cpp F16", slmkit_cmd(f16, free_port(), "llamacpp"), f16, False),
                 ("llama_cpp.server F16", llama_server_cmd(f16_gguf, f16, free_port()), f16, False)]
    result: dict = {"benchmark": "serve", "model": name, "max_tokens": args.max_tokens, "runs": []}
    result["runs"] = run_all(runs, args.levels, args.max_tokens, args.soak_seconds, args.soak_streams)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result, args.max_tokens)
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)


def report(result: dict, max_tokens: int) -> str:
    md = [f"# serve ({result['model']})", "",
          f"Streamed /v1/completions, ~128 prompt tokens, {max_tokens} new tokens each, temperature 0.7, same machine, "
          "one run; all servers up at once, each level run on one server after the other (the others idle). slmkit serves the default model on llama.cpp (`--backend llamacpp`, "
          "what `auto` picks: the packaged Q4_1 GGUF, continuously batched as sequences of one llama.cpp context) and "
          "on PyTorch (`--backend torch`: its float32 safetensors). llama-cpp-python's server (`python -m llama_cpp.server`) runs the same "
          "GGUF files with `--interrupt_requests False` (by default it aborts a running stream when another request "
          "arrives, failing 15 of 16 streams; this way it queues them). The F16 pair serves an F16 export of the same "
          "weights on both servers.", "",
          "| server | streams | errors | tokens/s (aggregate) | x own single | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |",
          "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, k=1: "-" if v is None else f"{v * k:.2f}"
    for run in result["runs"]:
        single = run["levels"][0]["tokens_per_s"]
        for r in run["levels"]:
            md.append(f"| {run['label']} | {r['streams']} | {r['errors']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / single:.2f} | "
                      f"{f(r['ttft_p50'])} | {f(r['ttft_p99'])} | {f(r['itl_p50'], 1000)} | {f(r['itl_p99'], 1000)} |")
    runs = {r["label"]: r for r in result["runs"]}
    at = lambda label, n: next((r["tokens_per_s"] for r in runs[label]["levels"] if r["streams"] == n), None) if label in runs else None
    md += ["", "## Targets (16 streams)", ""]
    for ours in ("slmkit llama.cpp Q4_1", "slmkit torch fp32", "slmkit llama.cpp F16"):
        if at(ours, 16) and at(ours, 1):
            md.append(f"- {ours}: {at(ours, 16) / at(ours, 1):.2f}x its single stream (target 5x)")
    for ours, theirs in (("slmkit llama.cpp Q4_1", "llama_cpp.server Q4_1"), ("slmkit llama.cpp F16", "llama_cpp.server F16"),
                         ("slmkit torch fp32", "llama_cpp.server Q4_1")):
        if at(ours, 16) and at(theirs, 16):
            md.append(f"- {ours} vs {theirs}: {at(ours, 16) / at(theirs, 16):.2f}x (target 3x)")
    errors = {r["label"]: sum(x["errors"] for x in r["levels"]) for r in result["runs"]}
    md.append("- errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    for run in result["runs"]:
        if "soak" in run:
            s = run["soak"]
            md.append(f"- soak {run['label']}, {s['seconds']:.0f} s at {s['streams']} streams: {s['requests']} requests, "
                      f"{s['errors']} errors, RSS {s['rss_mb_start']:.0f} MB -> {s['rss_mb_end']:.0f} MB ({s['rss_growth_pct']:+.1f}%)")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
