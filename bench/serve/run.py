"""Serving benchmark over real sockets on 127.0.0.1: slmkit serve vs llama-cpp-python's server, same run.

Each level sends N concurrent streams of ~128 prompt tokens asking for 128 tokens (streamed /v1/completions),
and records aggregate output tokens/s, time to first token and inter-token latency (p50, p99), and errors.
Then a soak: a steady load on slmkit for --soak-seconds while the server's resident memory is sampled.

    .venv/bin/pip install -c constraints.txt -e '.[dev]'
    .venv/bin/python bench/serve/run.py [--levels 1 4 8 16 32] [--soak-seconds 600]

Writes bench/results/serve.{json,md}. Both servers get 2 threads' worth of this machine.
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

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
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


async def one_stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
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
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    if not times:
        return {"error": "no tokens"}
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": len(times), "end": times[-1]}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--soak-seconds", type=float, default=600)
    ap.add_argument("--soak-streams", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from slmkit.sources.importer import ensure_default
    from slmkit.store import Store

    name = ensure_default()
    gguf = Store().path(name) / "model.gguf"
    env = dict(os.environ)
    ours_port, theirs_port = free_port(), free_port()
    ours_url, theirs_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
    result: dict = {"benchmark": "serve", "model": name, "max_tokens": args.max_tokens, "slmkit": [], "llama_cpp_server": []}

    ours = start([sys.executable, "-m", "slmkit", "serve", name, "--port", str(ours_port), "--max-batch", "32",
                  "--max-queue", "128", "--max-tokens", "512"], ours_url, env, name)
    try:
        for n in args.levels:
            result["slmkit"].append(asyncio.run(level(ours_url, name, n, args.max_tokens)))
            print("slmkit", json.dumps(result["slmkit"][-1]), flush=True)
        if args.soak_seconds > 0:
            result["soak"] = asyncio.run(soak(ours_url, name, ours.pid, args.soak_seconds, args.soak_streams))
            print("soak", json.dumps({k: v for k, v in result["soak"].items() if k != "samples"}), flush=True)
    finally:
        ours.terminate()
        ours.wait(30)
    theirs = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(os.cpu_count() or 2),
                    "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(theirs_port), "--model_alias", name,
                    # by default it aborts a running stream when another request arrives; queue them instead
                    "--interrupt_requests", "False"], theirs_url, env, name)
    try:
        for n in args.levels:
            result["llama_cpp_server"].append(asyncio.run(level(theirs_url, name, n, args.max_tokens)))
            print("llama_cpp", json.dumps(result["llama_cpp_server"][-1]), flush=True)
    finally:
        theirs.terminate()
        theirs.wait(30)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    single = result["slmkit"][0]["tokens_per_s"]
    md = [f"# serve ({name})", "", f"Streamed /v1/completions, ~128 prompt tokens, {args.max_tokens} new tokens each, temperature 0.7. "
          "slmkit serves the float32 safetensors in PyTorch with continuous batching; llama-cpp-python's server runs the "
          "packaged Q4_1 GGUF (4x fewer weight bytes) with `--interrupt_requests False` (by default it aborts a running "
          "stream when another request arrives, failing 15 of 16 streams; this way it queues them). Same machine, one run, "
          "one server at a time.", "",
          "| server | streams | errors | tokens/s (aggregate) | x single | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, k=1: "-" if v is None else f"{v * k:.2f}"
    for label, rows in (("slmkit", result["slmkit"]), ("llama_cpp.server", result["llama_cpp_server"])):
        for r in rows:
            md.append(f"| {label} | {r['streams']} | {r['errors']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / single:.2f} | "
                      f"{f(r['ttft_p50'])} | {f(r['ttft_p99'])} | {f(r['itl_p50'], 1000)} | {f(r['itl_p99'], 1000)} |")
    by = lambda rows, n: next((r for r in rows if r["streams"] == n), None)
    o16, t16 = by(result["slmkit"], 16), by(result["llama_cpp_server"], 16)
    md += ["", "## Targets", ""]
    if o16 and t16:
        md.append(f"- 16 streams vs slmkit single stream: {o16['tokens_per_s'] / single:.2f}x (target 5x)")
        md.append(f"- 16 streams vs llama-cpp-python's server: {o16['tokens_per_s'] / t16['tokens_per_s']:.2f}x (target 3x)")
    md.append(f"- errors: {sum(r['errors'] for r in result['slmkit'])} (slmkit), {sum(r['errors'] for r in result['llama_cpp_server'])} (llama.cpp server)")
    if "soak" in result:
        s = result["soak"]
        md.append(f"- soak {s['seconds']:.0f} s at {s['streams']} streams: {s['requests']} requests, {s['errors']} errors, "
                  f"RSS {s['rss_mb_start']:.0f} MB -> {s['rss_mb_end']:.0f} MB ({s['rss_growth_pct']:+.1f}%)")
    (RESULTS / "serve.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
