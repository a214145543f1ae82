"""Continuous batching: the same tokens as decoding alone, whatever joins or leaves the batch."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import slmkit
from slmkit.engine.kv_cache import PrefixCache, cut
from slmkit.engine.llamacpp_backend import LlamaCppBackend
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.scheduler import BatchedBackend, QueueFull
from slmkit.export.gguf import export_gguf
from slmkit.model import Model

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
PROMPTS = ["The quick brown fox", "Paris is the capital of France and", "héllo", "def add(a, b):\n    return",
           "Small language models run on laptops, offline", "Berlin"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_dir) -> Path:
    """An F32 GGUF of the tiny model, so the llama.cpp batch runs the same weights."""
    return export_gguf(tiny_dir, tmp_path_factory.mktemp("gguf"), name="tiny-f32", gguf_type="F32")


@pytest.fixture(params=["slots", "dynamic-cache", "llamacpp"])
def tiny_pair(store, request, tiny_gguf):
    """A plain backend and a batched one: the batch in the lean forward's slots, in transformers' cache, or in
    llama.cpp sequences (compared with llama.cpp decoding one sequence alone, with flash attention as the batch)."""
    if request.param == "llamacpp":
        plain = Model("tiny", LlamaCppBackend(tiny_gguf, threads=2, flash_attn=True))
        inner = LlamaCppBackend(tiny_gguf, threads=2, n_ctx=64)
    else:
        plain = slmkit.load("tiny")
        inner = slmkit.load("tiny").backend
    if request.param == "dynamic-cache":
        inner.fast = None
    batched = BatchedBackend(inner, max_batch=4, max_queue=16)
    kinds = {"slots": "SlotKV", "dynamic-cache": "DynamicKV", "llamacpp": "LlamaCppSlots"}
    assert type(batched.scheduler.store).__name__ == kinds[request.param]
    yield plain, batched
    batched.scheduler.stop()
    for b in (plain.backend, inner):
        if hasattr(b, "close"):
            b.close()


def test_batched_greedy_equals_single(tiny_pair):
    plain, batched = tiny_pair
    lengths = {p: 5 + 3 * i for i, p in enumerate(PROMPTS)}  # rows leave at different steps
    expected = {p: list(plain.backend.stream_tokens(plain.backend.encode(p), GREEDY, lengths[p])) for p in PROMPTS}
    results: dict[str, list[int]] = {}

    def run(p: str) -> None:
        results[p] = list(batched.stream_tokens(batched.encode(p), GREEDY, lengths[p]))

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]  # 6 requests, batch of 4: some wait
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected


def test_chunked_prefill_steps_running_rows_and_keeps_their_tokens(store):
    """New prompts go in 2-token pieces with decode steps of the running rows between them; rows that finish
    meanwhile leave, and every request still gets exactly the tokens it gets alone."""
    plain = slmkit.load("tiny")
    batched = BatchedBackend(slmkit.load("tiny").backend, max_batch=4, max_queue=16, prefill_chunk=2)
    try:
        lengths = {p: 2 + 2 * i for i, p in enumerate(PROMPTS)}  # short answers: rows leave during prefills
        expected = {p: list(plain.backend.stream_tokens(plain.backend.encode(p), GREEDY, lengths[p])) for p in PROMPTS}
        results: dict[str, list[int]] = {}

        def run(p: str) -> None:
            results[p] = list(batched.stream_tokens(batched.encode(p), GREEDY, lengths[p]))

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == expected
        assert batched.scheduler.prefill_steps > 0  # the running rows advanced while prompts were prefilled
    finally:
        batched.scheduler.stop()


def test_a_burst_sharing_a_cached_prompt_is_prefilled_in_one_forward(store):
    """Requests admitted together whose prompts extend a cached one by the same number of tokens are prefilled in
    one forward over their slots; each still gets the tokens it gets alone, one that ends at its first token never
    joins, and the rows after it take their places."""
    plain = slmkit.load("tiny")
    batched = BatchedBackend(slmkit.load("tiny").backend, max_batch=4, max_queue=16)
    sch = batched.scheduler
    try:
        base = plain.backend.encode("The quick brown fox jumps over")
        list(batched.stream_tokens(base, GREEDY, 2))  # its KV goes to the prefix cache
        prompts = [base + [t] for t in (5, 9, 13, 21)]
        lengths = [1, 6, 3, 5]
        expected = [list(plain.backend.stream_tokens(p, GREEDY, n)) for p, n in zip(prompts, lengths)]
        with sch._cv:  # all four wait in the queue, so the worker admits them in one round
            reqs = [sch.submit(p, GREEDY, n) for p, n in zip(prompts, lengths)]
        got = [[step.token for step in sch.steps(r)] for r in reqs]
        assert got == expected
        assert sch.burst_prefills == 1 and sch.prefix_cache.hits >= 4
    finally:
        sch.stop()


def test_seeded_sampling_is_the_same_batched_or_not(tiny_pair):
    plain, batched = tiny_pair
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=5)
    ids = plain.backend.encode("The quick brown")
    assert list(batched.stream_tokens(ids, params, 10)) == list(plain.backend.stream_tokens(ids, params, 10))


def test_model_api_on_the_batched_backend_and_prefix_reuse(tiny_pair):
    plain, batched = tiny_pair
    m = Model("tiny", batched)
    msgs = [{"role": "system", "content": "You are terse and exact."}, {"role": "user", "content": "hi"}]
    first = m.chat(msgs, temperature=0, max_tokens=6, repetition_penalty=1.0)
    assert first == plain.chat(msgs, temperature=0, max_tokens=6, repetition_penalty=1.0)
    msgs2 = msgs[:1] + [{"role": "user", "content": "hello"}]
    second = m.chat(msgs2, temperature=0, max_tokens=6, repetition_penalty=1.0)
    assert second == plain.chat(msgs2, temperature=0, max_tokens=6, repetition_penalty=1.0)
    cache = batched.scheduler.prefix_cache
    assert cache.hits >= 1 and cache.reused_tokens >= len(batched.encode("<|im_start|>system\nYou are terse"))


def test_cancel_frees_the_slot(tiny_pair):
    _, batched = tiny_pair
    it = batched.stream_tokens(batched.encode("The"), SamplingParams(temperature=1.0, seed=0), 10_000)
    next(it)
    it.close()  # the consumer goes away
    for _ in range(200):
        if batched.scheduler.batch_size == 0:
            break
        threading.Event().wait(0.01)
    assert batched.scheduler.batch_size == 0


def test_queue_full_is_refused(store):
    inner = slmkit.load("tiny").backend
    inner._eos = frozenset()  # the running request must not end by itself (a sampled EOS would free the slot)
    b = BatchedBackend(inner, max_batch=1, max_queue=1)
    try:
        long = SamplingParams(temperature=1.0, seed=0)
        running = b.stream_tokens(b.encode("The"), long, 10_000)
        next(running)
        waiting = b.stream_tokens(b.encode("A"), long, 5)  # fills the queue of 1
        with pytest.raises(QueueFull):
            b.stream_tokens(b.encode("B"), long, 5)
        running.close()
        assert len(list(waiting)) == 5
    finally:
        b.scheduler.stop()


def test_prefix_cache_lookup_and_bound():
    import torch

    pc = PrefixCache(max_tokens=10)
    kv = [(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2))]
    pc.store([1, 2, 3, 4, 5, 6], kv)
    n, got = pc.lookup([1, 2, 3, 9])
    assert n == 3 and got is kv and cut(got, n)[0][0].shape[2] == 3
    n, got = pc.lookup([1, 2, 3, 4, 5, 6])
    assert n == 5  # one token is always left to compute
    pc.store([7, 8, 9, 10, 11, 12], kv)
    assert [e[0][0] for e in pc.entries] == [7]  # over 10 tokens: the least recently used went
    assert 0 < pc.hit_rate < 1


def test_the_models_other_work_runs_on_the_scheduler_thread_between_steps(store):
    """Embeddings, scoring and static batches of a served model run on the scheduler's thread (one OpenMP pool
    per process), between the steps of a running request, with the same results; their errors reach the caller."""
    import torch

    inner = slmkit.load("tiny").backend
    inner._eos = frozenset()
    want = inner.embed(["hello world"])
    b = BatchedBackend(inner, max_batch=2, max_queue=4)
    seen = []
    real_embed = inner.embed
    inner.embed = lambda texts: seen.append(threading.current_thread().name) or real_embed(texts)
    try:
        running = b.stream_tokens(b.encode("The"), SamplingParams(temperature=1.0, seed=0), 10_000)
        next(running)
        assert b.embed(["hello world"]) == want
        assert seen == ["slmkit-scheduler"]
        ids = b.encode("Paris is the capital")
        got, ref = b.score_batch([(ids, 2)]), inner.score_batch([(ids, 2)])
        assert got == ref and [s.greedy for s in got] == [s.greedy for s in ref]
        torch.testing.assert_close(b.logprob_rows(ids), inner.logprob_rows(ids))
        inner.embed = lambda texts: 1 / 0
        with pytest.raises(ZeroDivisionError):
            b.embed(["x"])
        next(running)  # the running request went on
        running.close()
    finally:
        b.scheduler.stop()


class _Poison:
    """A constraint whose mask turns a row's scores into NaN after `after` tokens: a row gone non-finite."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def mask(self, row) -> None:
        if self.seen >= self.after:
            row.fill_(float("nan"))

    def advance(self, token: int) -> None:
        self.seen += 1


@pytest.mark.parametrize("after", [0, 3], ids=["at-its-first-token", "mid-stream"])
def test_a_poisoned_row_fails_alone_and_the_batch_keeps_its_tokens(tiny_pair, after):
    """A request whose scores go non-finite (at prefill or mid-stream) ends with a clear error; the requests running
    beside it get exactly the tokens they get alone."""
    from dataclasses import replace

    from slmkit.engine.sampling import RowsFailed

    plain, batched = tiny_pair
    live = PROMPTS[:3]
    expected = {p: list(plain.backend.stream_tokens(plain.backend.encode(p), GREEDY, 12)) for p in live}
    results: dict[str, object] = {}

    def run(p: str, params: SamplingParams) -> None:
        try:
            results[p] = list(batched.stream_tokens(batched.encode(p), params, 12))
        except RowsFailed as exc:
            results[p] = exc

    poisoned = replace(SamplingParams(temperature=0.7, seed=1), constraint=_Poison(after))
    threads = [threading.Thread(target=run, args=(p, GREEDY)) for p in live]
    threads.insert(1, threading.Thread(target=run, args=(PROMPTS[4], poisoned)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results[PROMPTS[4]], RowsFailed) and "not finite" in results[PROMPTS[4]].message
    assert {p: results[p] for p in live} == expected
    # the scheduler is still healthy
    assert list(batched.stream_tokens(batched.encode(live[0]), GREEDY, 12)) == expected[live[0]]


def test_one_client_cannot_starve_the_rest(store):
    """A client holds at most its share of the queue (429 for it alone), and the next free batch slot goes to the
    client with the fewest running requests, not to whoever queued most."""
    import contextvars
    import time

    from slmkit.engine.scheduler import CLIENT

    inner = slmkit.load("tiny").backend
    inner._eos = frozenset()  # nothing ends by itself
    b = BatchedBackend(inner, max_batch=1, max_queue=4)  # a share of 2 waiting per client
    admitted: list[str] = []  # the clients in the order the scheduler gave them the batch slot
    pick = b.scheduler._next_fair

    def spy(admitting):
        req = pick(admitting)
        admitted.append(req.client)
        return req

    b.scheduler._next_fair = spy

    def as_client(who: str, fn, *args):
        ctx = contextvars.copy_context()
        ctx.run(CLIENT.set, who)
        return ctx.run(fn, *args)

    def consume(name: str, stream) -> None:
        for _ in stream:
            pass

    try:
        long = SamplingParams(temperature=0, repetition_penalty=1.0)
        a1 = as_client("A", b.stream_tokens, b.encode("The"), long, 10_000)
        next(a1)  # A's first request runs
        a_waiting = [as_client("A", b.stream_tokens, b.encode("The"), long, 3) for _ in range(2)]
        with pytest.raises(QueueFull, match="this client already has 2 requests waiting"):
            as_client("A", b.stream_tokens, b.encode("The"), long, 3)
        b1 = as_client("B", b.stream_tokens, b.encode("The"), long, 3)  # B still gets in
        threads = [threading.Thread(target=consume, args=(n, s)) for n, s in (("A2", a_waiting[0]), ("A3", a_waiting[1]), ("B1", b1))]
        for t in threads:
            t.start()
        time.sleep(0.2)
        a1.close()  # the one batch slot frees: B, with nothing running, goes before A's older requests
        for t in threads:
            t.join(60)
        assert admitted == ["A", "B", "A", "A"], admitted  # (admission order, not the readers' wake-up times)
    finally:
        b.scheduler.stop()
