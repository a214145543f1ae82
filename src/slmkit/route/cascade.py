"""A routed model: the small model first, the large target when a policy says so.

`RoutedModel` looks like a Model to the server (stream_chat / stream return a Generation-like object: an iterator
of text pieces with `text`, `stats`, `steps` and `close()`), so a routed name is served like any other. What happens
for one request:
1. decide-before policies (rules, trained router) on the last user message: escalate at once;
2. else the small model answers. With decide-after policies (confidence) its answer is generated whole first
   (a streamed answer cannot be taken back), its confidence computed from the decode loop's steps, and the
   large target asked when it is too low; without them the small answer streams as it comes;
3. a large target that fails or times out before its first piece falls back to the small answer, marked as such.
Every request ends in one `Outcome` handed to `on_outcome` (metrics, the decision log, the drift watch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slmkit.engine.decode import Step
from slmkit.model import GenerationStats, Message, TextStream
from slmkit.route.policies import Chain, Decision
from slmkit.route.signals import TOP_FOR_ENTROPY, Signals, signals_of


@dataclass
class Outcome:
    route: str
    answered_by: str = "small"  # small | large | small_fallback
    decision: Decision | None = None
    signals: Signals | None = None
    would_escalate: bool = False  # small-only mode: what the policy said
    small_s: float | None = None
    large_s: float | None = None
    prompt_chars: int = 0
    error: str | None = None
    # an escalated request and the large model's whole answer, as a training row ({"messages"} or {"text"}): only the
    # opt-in escalation log keeps it (serve --escalation-log); the decision log never has text
    exchange: dict[str, Any] | None = field(default=None, repr=False)

    def as_record(self) -> dict[str, Any]:
        return {"route": self.route, "answered_by": self.answered_by,
                "decision": asdict(self.decision) if self.decision else None,
                "signals": self.signals.as_dict() if self.signals else None, "would_escalate": self.would_escalate,
                "small_s": self.small_s, "large_s": self.large_s, "prompt_chars": self.prompt_chars, "error": self.error}


def last_user_text(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return str(messages[-1].get("content", "")) if messages else ""


class RoutedGeneration(TextStream):
    """One routed request, consumed as text pieces like a Generation."""

    def __init__(self, route: "RoutedModel", prompt: str, prompt_tokens: int, small: Callable[..., Any],
                 large: Callable[..., Iterator[str]], sampling: dict[str, Any], messages: Sequence[Message] | None = None) -> None:
        self.text = ""
        self._request = {"messages": [dict(m) for m in messages]} if messages is not None else {"text": prompt}
        self._large_text: list[str] = []
        self.steps: list[Step] = []
        self.stats = GenerationStats(prompt_tokens=prompt_tokens)
        self.outcome = Outcome(route.name, prompt_chars=len(prompt))
        self._route = route
        self._pieces = self._run(prompt, small, large, sampling)

    def _small_whole(self, small: Callable[..., Any], sampling: dict[str, Any], top: int) -> tuple[str, Any]:
        t = time.perf_counter()
        kw = dict(sampling, top_logprobs=max(top, sampling.get("top_logprobs") or 0))
        gen = small(**kw)
        try:
            text = gen.read()
        finally:
            gen.close()
        self.outcome.small_s = time.perf_counter() - t
        return text, gen

    def _take_small_stats(self, gen: Any) -> None:
        self.steps = list(gen.steps)
        self.stats.completion_tokens = gen.stats.completion_tokens
        self.stats.finish_reason = gen.stats.finish_reason

    def _large(self, large: Callable[..., Iterator[str]], sampling: dict[str, Any]) -> Generator[str, None, bool]:
        """Stream the large target's answer; False when it failed before its first piece (nothing was sent)."""
        t = time.perf_counter()
        it = None
        try:
            it = large(**sampling)
            first = next(it, None)
        except Exception as exc:  # unreachable, time-out, 5xx: the small answer stands in
            self.outcome.error = f"{type(exc).__name__}: {exc}"[:300]
            self.outcome.large_s = time.perf_counter() - t
            if it is not None:
                it.close()
            return False
        self.outcome.answered_by = "large"
        self.steps, self.stats.completion_tokens, self.stats.finish_reason = [], 0, "stop"
        try:
            if first is not None:
                self.stats.completion_tokens += 1
                self._large_text.append(first)
                yield first
            for piece in it:
                self.stats.completion_tokens += 1  # pieces: a streamed endpoint does not say how many tokens each holds
                self._large_text.append(piece)
                yield piece
        except Exception as exc:  # failed mid-answer: what was sent stays; the log says so
            self.outcome.error = f"mid-stream: {type(exc).__name__}: {exc}"[:300]
            self.stats.finish_reason = "error"
        finally:
            it.close()
            self.outcome.large_s = time.perf_counter() - t
        return True

    def _escalate(self, large: Callable[..., Iterator[str]], sampling: dict[str, Any]) -> Generator[str, None, bool]:
        """The policy said escalate: stream the large answer (True), or in small-only mode or when the large target
        failed before answering, leave it to the small one (False), marked."""
        if self._route.small_only:
            self.outcome.would_escalate = True
            return False
        if (yield from self._large(large, sampling)):
            return True
        self.outcome.answered_by = "small_fallback"
        return False

    def _run(self, prompt: str, small: Callable[..., Any], large: Callable[..., Iterator[str]],
             sampling: dict[str, Any]) -> Iterator[str]:
        r, out = self._route, self.outcome
        try:
            before = r.chain.decide_before(prompt, r.embed(prompt) if r.chain.needs_embedding else None)
            if before is not None:
                out.decision = before
                if (yield from self._escalate(large, sampling)):
                    return
            if not r.chain.after or (before is not None):  # nothing to judge after: the small answer streams
                t = time.perf_counter()
                gen = small(**sampling)
                try:
                    yield from gen
                finally:
                    gen.close()
                    self._take_small_stats(gen)
                    out.small_s = time.perf_counter() - t
                    out.signals = signals_of(gen.steps) if gen.steps else None
                return
            text, gen = self._small_whole(small, sampling, TOP_FOR_ENTROPY)
            self._take_small_stats(gen)
            out.signals = signals_of(gen.steps)
            after = r.chain.decide_after(prompt, out.signals)
            out.decision = after or Decision(False, "confident", "confidence", out.signals.get(r.chain.after[0].signal))
            if after is not None and (yield from self._escalate(large, sampling)):
                return
            if text:
                yield text
        finally:
            if out.answered_by == "large" and not out.error:
                answer = "".join(self._large_text)
                out.exchange = ({"messages": self._request["messages"] + [{"role": "assistant", "content": answer}]}
                                if "messages" in self._request else {"text": self._request["text"] + answer})
            r.report(out)


@dataclass
class RoutedModel:
    """A served name that routes between `small` (a Model) and `large` (a target: route.targets.Local or sources.endpoint.Endpoint)."""

    name: str
    small: Any
    large: Any
    chain: Chain
    small_only: bool = False
    on_outcome: list[Callable[[Outcome], None]] = field(default_factory=list)
    card: Any = None
    single: None = None  # (Servable) an answer may come from the large model

    @property
    def backend(self) -> Any:  # token counts and embeddings come from the small model
        return self.small.backend

    def count_tokens(self, text: str) -> int:
        return self.small.count_tokens(text)

    def count_chat(self, messages: Sequence[Message]) -> int:
        return self.small.count_chat(messages)

    def embed(self, text: str) -> list[float]:
        return self.small.backend.embed([text])[0]

    def report(self, outcome: Outcome) -> None:
        for f in self.on_outcome:
            f(outcome)

    def stream_chat(self, messages: Sequence[Message], **sampling: Any) -> RoutedGeneration:
        msgs = [dict(m) for m in messages]
        n = self.small.count_chat(msgs)
        return RoutedGeneration(self, last_user_text(msgs), n, lambda **kw: self.small.stream_chat(msgs, **kw),
                                lambda **kw: self.large.stream_chat(msgs, **kw), sampling, messages=msgs)

    def stream(self, prompt: str, **sampling: Any) -> RoutedGeneration:
        n = self.small.count_tokens(prompt)
        return RoutedGeneration(self, prompt, n, lambda **kw: self.small.stream(prompt, **kw),
                                lambda **kw: self.large.stream(prompt, **kw), sampling)

    def chat(self, messages: Sequence[Message], **sampling: Any) -> str:
        return self.stream_chat(messages, **sampling).read()
