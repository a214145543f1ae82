"""Check slmkit eval against references on the default model, in one run:

1. ARC-Easy accuracy: slmkit's arc_easy vs lm-evaluation-harness on the same local file (target: within 0.5 points).
2. WikiText-2 perplexity: slmkit vs a plain transformers loop written here (target: within 1%).

Needs the dev extra (pip install -c constraints.txt -e '.[dev]'). Run:
    .venv/bin/python bench/eval_reference/run.py [--limit 500] [--ppl-chars 60000]
Writes bench/results/eval_reference.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE.parent / "results"


def plain_transformers_ppl(model, tokenizer, text: str, ctx: int, stride: int) -> tuple[float, int]:
    """The windowing of the transformers perplexity guide, with an EOS prefix token so every token is scored."""
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    nll, count, prev_end = 0.0, 0, 1
    with torch.inference_mode():
        for begin in range(0, len(ids), stride):
            end = min(begin + ctx, len(ids))
            x = torch.tensor([ids[begin:end]])
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            for pos in range(max(prev_end, begin + 1), end):
                nll -= float(logp[pos - begin - 1, ids[pos]])
                count += 1
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count), count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=500, help="ARC-Easy questions (of 2376)")
    ap.add_argument("--ppl-chars", type=int, default=60000, help="characters of wiki.test.raw for the perplexity check")
    args = ap.parse_args()

    import slmkit
    from slmkit.config import settings
    from slmkit.evaluate.choice import evaluate_task
    from slmkit.evaluate.perplexity import perplexity
    from slmkit.store import Store

    data = settings().data_dir
    model = slmkit.load()
    folder = Store().path(model.name)

    t = time.perf_counter()
    ours = evaluate_task(model, "arc_easy", limit=args.limit)
    ours_s = time.perf_counter() - t

    import lm_eval
    from lm_eval.tasks import TaskManager

    (HERE / "arc_easy_local.yaml").write_text((HERE / "arc_easy_local.yaml.in").read_text().replace("@DATA@", str(data)))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t = time.perf_counter()
    ref = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["slmkit_arc_easy_local"],
        task_manager=TaskManager(include_path=str(HERE)), limit=args.limit, batch_size=16, device="cpu",
    )
    ref_s = time.perf_counter() - t
    ref_task = ref["results"]["slmkit_arc_easy_local"]

    text = (data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[: args.ppl_chars]
    t = time.perf_counter()
    ours_ppl = perplexity(model, text, context_length=1024, stride=512)
    ours_ppl_s = time.perf_counter() - t
    b = model.backend
    ref_ppl, ref_count = plain_transformers_ppl(b.model, b.tokenizer, text, 1024, 512)

    result = {
        "benchmark": "eval_reference",
        "model": model.name,
        "arc_easy": {
            "questions": ours["n"],
            "slmkit": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "acc_stderr": ours["acc_stderr"], "seconds": ours_s},
            "lm_eval": {"version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
                        "acc": ref_task["acc,none"], "acc_norm": ref_task["acc_norm,none"], "seconds": ref_s},
            "diff_points_acc": 100 * abs(ours["acc"] - ref_task["acc,none"]),
            "diff_points_acc_norm": 100 * abs(ours["acc_norm"] - ref_task["acc_norm,none"]),
        },
        "perplexity": {
            "text": f"wiki.test.raw, first {args.ppl_chars} characters",
            "slmkit": {"perplexity": ours_ppl["perplexity"], "tokens": ours_ppl["tokens"],
                       "bits_per_byte": ours_ppl["bits_per_byte"], "seconds": ours_ppl_s},
            "plain_transformers": {"perplexity": ref_ppl, "tokens": ref_count},
            "rel_diff": abs(ours_ppl["perplexity"] - ref_ppl) / ref_ppl,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_reference.json").write_text(json.dumps(result, indent=2) + "\n")
    a, p = result["arc_easy"], result["perplexity"]
    md = f"""# eval_reference ({model.name})

| check | slmkit | reference | difference | target |
|---|---|---|---|---|
| ARC-Easy acc ({a['questions']} q) | {a['slmkit']['acc']:.4f} | {a['lm_eval']['acc']:.4f} (lm-eval) | {a['diff_points_acc']:.2f} points | <= 0.5 |
| ARC-Easy acc_norm | {a['slmkit']['acc_norm']:.4f} | {a['lm_eval']['acc_norm']:.4f} (lm-eval) | {a['diff_points_acc_norm']:.2f} points | <= 0.5 |
| WikiText-2 ppl ({p['slmkit']['tokens']} tokens) | {p['slmkit']['perplexity']:.4f} | {p['plain_transformers']['perplexity']:.4f} (plain loop) | {100 * p['rel_diff']:.3f}% | <= 1% |

Time: slmkit ARC {a['slmkit']['seconds']:.0f} s, lm-eval ARC {a['lm_eval']['seconds']:.0f} s (same machine, same run).
"""
    (RESULTS / "eval_reference.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
