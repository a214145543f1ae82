"""Data the teacher writes itself, for users with little text: prompts taken from the user's examples (the user's
turn of a conversation, or the first words of a text), continued by the teacher with temperature and top-p sampling.
The result is a JSON-lines file of the same kinds of rows, written atomically, that joins the training data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.engine.sampling import SamplingParams
from slmkit.train.data import Example

PROMPT_WORDS = 12  # a text's first words make its prompt
BATCH = 8


def prompts_of(examples: list[Example], n: int, seed: int) -> list[Example]:
    """n prompts drawn (with a seed) from the examples: a conversation without its last assistant turn, or the first
    PROMPT_WORDS words of a text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = examples[rng.randrange(len(examples))]
        if ex.text is not None:
            out.append(Example(text=" ".join(ex.text.split()[:PROMPT_WORDS])))
        else:
            last = max(i for i, (role, _) in enumerate(ex.messages) if role == "assistant")
            out.append(Example(messages=ex.messages[:last]))
    return out


def write_synthetic(backend: Any, examples: list[Example], n: int, path: Path, *, max_tokens: int = 128,
                    temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Generate n samples with `backend` (an engine Backend of the teacher) into `path`; returns what was made."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.1, seed=seed)
    prompts = prompts_of(examples, n, seed)
    rows = []
    with progress.bar("teacher writing data", total=n) as advance:
        for i in range(0, n, BATCH):
            chunk = prompts[i: i + BATCH]
            ids = []
            for p in chunk:
                if p.text is not None:
                    ids.append(backend.encode(p.text, add_special_tokens=True))
                else:
                    text = backend.render_chat([{"role": r, "content": c} for r, c in p.messages], add_generation_prompt=True)
                    ids.append(backend.encode(text, add_special_tokens=False))
            outs = backend.generate_batch(ids, SamplingParams(**{**params.to_dict(), "seed": seed + i}), max_tokens)
            for p, out in zip(chunk, outs):
                reply = backend.decode([s.token for s in out if s.token not in backend.eos_token_ids]).strip()
                if p.text is not None:
                    rows.append({"text": p.text + " " + reply})
                else:
                    rows.append({"messages": [{"role": r, "content": c} for r, c in p.messages] + [{"role": "assistant", "content": reply}]})
            advance(len(chunk))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": str(path), "samples": len(rows), "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "seed": seed}


def write_from_endpoint(endpoint: Any, examples: list[Example], n: int, path: Path, *, max_tokens: int = 128,
                        temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, rate: float = 0.0) -> dict[str, Any]:
    """A black-box teacher (sources/endpoint.Endpoint: any OpenAI-compatible server) answers n prompts drawn from the
    examples, one request each, at most `rate` requests per second (0: as fast as it answers). Every answer is
    appended to `path` as it arrives (a conversation row: the prompt's turns and the teacher's reply), so a run that
    stops goes on after the answers it has: the prompts are the same for the same seed."""
    import time

    prompts = prompts_of(examples, n, seed)
    have = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    done = len([x for x in have if x.strip()])
    path.parent.mkdir(parents=True, exist_ok=True)
    last = 0.0
    with progress.bar(f"teacher {endpoint.label} answering", total=n) as advance, open(path, "a", encoding="utf-8") as fh:
        advance(min(done, n))
        for i in range(done, n):
            p = prompts[i]
            messages = [{"role": "user", "content": p.text}] if p.text is not None else [{"role": r, "content": c} for r, c in p.messages]
            if rate > 0:
                time.sleep(max(0.0, last + 1 / rate - time.monotonic()))
            last = time.monotonic()
            reply = "".join(endpoint.stream_chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                 seed=seed + i)).strip()
            fh.write(json.dumps({"messages": messages + [{"role": "assistant", "content": reply}]}, ensure_ascii=False) + "\n")
            fh.flush()
            advance(1)
    return {"file": str(path), "samples": n, "reused": min(done, n), "teacher": endpoint.label, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed, "rate": rate}
