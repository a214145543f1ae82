"""Speed and footprint: time to first token, prefill and decode tokens/s at batch 1 and batched, memory, size."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from slmkit.engine.sampling import SamplingParams
from slmkit.model import Model

PASSAGE = (
    "The lighthouse stood at the edge of the northern cliffs, where the sea met the land in a long line of white "
    "foam. Every evening the keeper climbed the spiral stairs, trimmed the wick, and watched the beam sweep across "
    "the water. Ships passing in the night counted the flashes to learn where they were. "
)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def measure_speed(model: Model, *, prompt_tokens: int = 256, new_tokens: int = 64, batch: int = 4, repeats: int = 2) -> dict[str, Any]:
    """Best of `repeats` runs; greedy so that runs are comparable. Sizes shrink to fit a small context window."""
    ctx = model.backend.context_length
    new_tokens = min(new_tokens, ctx // 4)
    prompt_tokens = min(prompt_tokens, ctx - new_tokens - 1)
    prompt = PASSAGE
    while model.count_tokens(prompt) < prompt_tokens:
        prompt += PASSAGE
    ids = model.backend.encode(prompt, add_special_tokens=True)[:prompt_tokens]
    text = model.backend.decode(ids)
    params = dict(temperature=0, repetition_penalty=1.0, max_tokens=new_tokens)
    best = None
    reset = getattr(model.backend, "reset", None)  # a backend with a prefix cache must not reuse it here
    for _ in range(repeats):
        if reset is not None:
            reset()
        gen = model.stream(text, **params)
        gen.read()
        if best is None or gen.stats.total_s < best.total_s:
            best = gen.stats
    assert best is not None
    result: dict[str, Any] = {
        "prompt_tokens": best.prompt_tokens,
        "generated_tokens": best.completion_tokens,
        "time_to_first_token_s": best.time_to_first_token_s,
        "prefill_tokens_per_s": best.prompt_tokens / best.time_to_first_token_s if best.time_to_first_token_s else None,
        "decode_tokens_per_s": best.decode_tokens_per_s,
    }
    if batch > 1:
        short = ids[: min(64, len(ids))]
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            outs = model.backend.generate_batch([short] * batch, SamplingParams(**params), new_tokens, stop_at_eos=False)
            rates.append(sum(len(o) for o in outs) / (time.perf_counter() - t))
        result.update({"batch": batch, "batch_prompt_tokens": len(short), "batched_tokens_per_s": max(rates)})
    else:
        result.update({"batch": None, "batched_tokens_per_s": None})
    card = model.card
    weights = card.weights_bytes if card else {}
    result.update({
        "peak_rss_mb": peak_rss_mb(),
        "size_bytes": weights.get("gguf" if model.backend.name == "llamacpp" else "safetensors") or (card.size_bytes if card else None),
        "parameters": card.parameters if card else None,
    })
    return result
