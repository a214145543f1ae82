"""Benchmark: cold import and warm load of the default model, and decode speed of our loop vs transformers' generate().

Run: .venv/bin/python bench/load_and_decode.py   (writes bench/results/load_and_decode.{json,md})
Both decoders run in the same process, on the same weights and prompt, greedy, so their ratio is meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
NEW_TOKENS = 128


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["SLMKIT_HOME"] = home
        import slmkit
        from slmkit.sources.importer import ensure_default

        t = time.perf_counter()
        ensure_default()
        cold_import_s = time.perf_counter() - t
        t = time.perf_counter()
        model = slmkit.load()
        warm_load_s = time.perf_counter() - t

        ours = []
        for _ in range(3):
            gen = model.stream_chat(PROMPT, temperature=0, max_tokens=NEW_TOKENS, repetition_penalty=1.0, stop=["\x00"])
            gen.read()
            ours.append(gen.stats)
        best = max(ours, key=lambda s: s.decode_tokens_per_s)

        b = model.backend
        ids = torch.tensor([b.encode(b.render_chat(PROMPT), add_special_tokens=False)])
        hf_rates = []
        with torch.inference_mode():
            for _ in range(3):
                t = time.perf_counter()
                out = b.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
                n = out.shape[1] - ids.shape[1]
                hf_rates.append(n / (time.perf_counter() - t))

    result = {
        "benchmark": "load_and_decode",
        "model": "smollm2-135m-instruct (float32, from the Q4_1 GGUF)",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "platform": platform.platform()},
        "cold_import_s": round(cold_import_s, 2),
        "warm_load_s": round(warm_load_s, 2),
        "prompt_tokens": best.prompt_tokens,
        "generated_tokens": best.completion_tokens,
        "time_to_first_token_s": round(best.time_to_first_token_s, 3),
        "slmkit_decode_tokens_per_s": round(best.decode_tokens_per_s, 2),
        "transformers_generate_tokens_per_s": round(max(hf_rates), 2),
        "ratio_slmkit_over_transformers": round(best.decode_tokens_per_s / max(hf_rates), 2),
        "note": "best of 3 runs each, greedy, same process; transformers' rate includes prefill",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_and_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# load_and_decode", "", "| metric | value |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in result.items() if not isinstance(v, dict)
    ]
    (RESULTS / "load_and_decode.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
