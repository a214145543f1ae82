"""What the benchmarks share: where results go, the default model's store name, the slmkit CLI (run quietly, or with
its peak memory), whether a model is in a store, the CPU line results record, and writing a result. Every bench script imports it
(a script under bench/NAME/ puts bench/ on sys.path first; one in bench/ finds it beside itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BASE = "smollm2-135m-instruct"
SLMKIT = [sys.executable, "-m", "slmkit"]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
_PEAK = ("import resource, sys\nfrom slmkit.cli import main\nsys.argv = ['slmkit'] + sys.argv[1:]\ntry:\n    main()\n"
         "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\nsys.exit(code)\n")


def write_results(stem: str, result: dict, markdown: str) -> None:
    """bench/results/STEM.json (the numbers) and STEM.md (the report made from them), and the report on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)


def slmkit(args: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run the slmkit CLI in a fresh process: its stdout and its peak resident set in MB (a failure raises with the
    ends of its output)."""
    r = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"slmkit {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    kb = next(int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return r.stdout, kb // 1024


def sh(args: list[str], env: dict[str, str] | None = None) -> None:
    """Run a command (its output dropped); a failure raises."""
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)


def exists(name: str, env: dict[str, str]) -> bool:
    return subprocess.run(SLMKIT + ["models", "show", name, "--json"], env=env, capture_output=True).returncode == 0


def cpu_line() -> str:
    """'MODEL; N cores; the vector flags it has' from lscpu."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = lambda k: next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(k)), "")  # noqa: E731
    flags = field("Flags").split()
    return f"{field('Model name') or '?'}; {os.cpu_count()} cores; " + " ".join(f for f in CPU_FLAGS if f in flags)


def decode_speeds(fast, prompt: list[int]) -> dict[str, float]:
    """Through a lean forward `fast`: batch-1 decode and a 16-row step after `prompt` (tokens/s), and a 512-token
    prefill (tokens/s). The same numbers in every bench that compares engines."""
    import time

    import torch

    res = {}
    with torch.inference_mode():
        for rows in (1, 16):
            cache = fast.new_cache(rows, 512)
            for r in range(rows):
                fast.forward(cache, torch.tensor([prompt]), first=r)
            tok = torch.full((rows, 1), 42)
            for _ in range(3):
                fast.forward(cache, tok)
            t0, n = time.perf_counter(), 40
            for _ in range(n):
                fast.forward(cache, tok)
            res[f"decode_{rows}_tok_s"] = rows * n / (time.perf_counter() - t0)
        ids = torch.randint(100, 10000, (1, 512))
        fast.forward(fast.new_cache(1, 600), ids[:, :32])  # warm up
        cache = fast.new_cache(1, 600)
        t0 = time.perf_counter()
        fast.forward(cache, ids)
        res["prefill_512_tok_s"] = 512 / (time.perf_counter() - t0)
    return res


def token_logprobs(backend, window: list[int]):
    """Each token's log-probability after the window's tokens before it (numpy (T-1,)), through the backend's
    logprob_rows: what a perplexity is made of, for any engine."""
    import torch

    with torch.inference_mode():
        rows = backend.logprob_rows(window)  # (T-1, V)
        return rows.gather(-1, torch.tensor(window[1:])[:, None]).squeeze(-1).double().numpy()
