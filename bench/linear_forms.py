"""Why the lean forward computes float linears as (W x^T)^T: both forms, the default model's shapes, 1-32 rows.

PyTorch's CPU wheels use MKL, whose kernel choice for `x @ W^T` (what nn.Linear calls) is poor on AMD CPUs at a
few rows. Same weights, same result; only the GEMM's operand order differs. Each timing is the best of 5, the two
forms alternating, with fresh weights per layer of a 30-layer stack (so weights come from memory, as in decoding).

    .venv/bin/python bench/linear_forms.py

Writes bench/results/linear_forms.{json,md}.
"""

from __future__ import annotations

import json
import platform
import time

import torch
import torch.nn.functional as F

from common import RESULTS  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
LAYERS = 30
HEAD = (49152, 576)


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    torch.manual_seed(0)
    stack = [[torch.randn(*shape) * 0.02 for shape in SHAPES] for _ in range(LAYERS)]
    head = torch.randn(*HEAD) * 0.02
    rows_out = []
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16, 32):
            xs = {k: torch.randn(rows, k) for k in (576, 1536)}
            linear = lambda: [F.linear(xs[w.shape[1]], w) for layer in stack for w in layer]
            flipped = lambda: [torch.mm(w, xs[w.shape[1]].T).T for layer in stack for w in layer]
            a, b = best_ms(linear), best_ms(flipped)
            ha, hb = best_ms(lambda: F.linear(xs[576], head)), best_ms(lambda: torch.mm(head, xs[576].T).T)
            assert torch.allclose(F.linear(xs[576], head), torch.mm(head, xs[576].T).T, atol=1e-4)
            rows_out.append({"rows": rows, "layers_linear_ms": a, "layers_flipped_ms": b, "head_linear_ms": ha, "head_flipped_ms": hb})
            print(json.dumps(rows_out[-1]), flush=True)
    result = {"benchmark": "linear_forms", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "blas": "mkl" if torch.backends.mkl.is_available() else "other", "rows": rows_out}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "linear_forms.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# linear forms: x W^T (nn.Linear) vs (W x^T)^T", "",
          f"torch {torch.__version__}, {torch.get_num_threads()} threads. 30 layers of the default model's 7 matrices "
          "(weights from memory, not cache), and the 49152x576 output head. Best of 5, ms.", "",
          "| rows | 30 layers: x W^T | 30 layers: (W x^T)^T | speedup | head: x W^T | head: (W x^T)^T | speedup |",
          "|---|---|---|---|---|---|---|"]
    for r in rows_out:
        md.append(f"| {r['rows']} | {r['layers_linear_ms']:.1f} | {r['layers_flipped_ms']:.1f} | {r['layers_linear_ms'] / r['layers_flipped_ms']:.2f}x | "
                  f"{r['head_linear_ms']:.1f} | {r['head_flipped_ms']:.1f} | {r['head_linear_ms'] / r['head_flipped_ms']:.2f}x |")
    (RESULTS / "linear_forms.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
