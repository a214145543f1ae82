"""The Python API: a loaded model that generates, chats (both streaming or not) and scores text.

Backend-independent: everything here works on token ids from a `Backend` and turns them into text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from slmkit.card import ModelCard
from slmkit.data.classify import check_format, check_labels, plain_answer, plain_prompt, task_of
from slmkit.engine.backend import Backend
from slmkit.engine.constrained import constraint_for
from slmkit.engine.decode import Step
from slmkit.engine.mixture import MixtureBackend
from slmkit.engine.sampling import SamplingParams
from slmkit.engine.scheduler import BatchedBackend
from slmkit.engine.scoring import encode_document, encode_pair
from slmkit.engine.text_stream import IncrementalDecoder, StopMatcher
from slmkit.errors import PromptTooLong, SlmkitError
from slmkit.sources.modelfile import PRESET_KEY

Message = dict[str, Any]  # role, content (text); assistant tool_calls and tool results where a template takes them


@dataclass
class GenerationStats:
    """Filled in while a generation runs; complete once it is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    checks: int = 0  # speculative decoding: checks run, drafted tokens checked, and those kept
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (prefill excluded)."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


class TextStream:
    """An iterator of text pieces drawn from `self._pieces`: `text` grows as it is consumed, `stats` and `steps` say
    how it went; closing it stops whatever produces the pieces. Generation, a routed answer and a cached one are
    all TextStreams, so callers (CLI, server) treat them alike."""

    text: str
    stats: GenerationStats
    steps: list[Step]
    _pieces: Iterator[str]

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def read(self) -> str:
        """Consume the rest and return the whole text."""
        for _ in self:
            pass
        return self.text


class Generation(TextStream):
    """A model generating: pieces come from the decode loop. Closing it stops the backend."""

    def __init__(self, model: "Model", prompt_ids: list[int], params: SamplingParams) -> None:
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.text = ""
        self.prompt_ids = prompt_ids
        self.steps: list[Step] = []  # every generated token with its log-probability, the final EOS included
        self._pieces = model._pieces(prompt_ids, params, self.stats, self.steps)

    @property
    def token_ids(self) -> list[int]:
        return [s.token for s in self.steps]


@dataclass
class Score:
    """Log-probabilities (natural log) of each scored token given everything before it."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return self.total / len(self.logprobs) if self.logprobs else 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean) if self.logprobs else float("nan")


@dataclass
class Classification:
    """A classification: the likeliest label, every label's log-likelihood score and its probability among the
    labels (a softmax over the scores), and the prompt's length in tokens."""

    label: str
    scores: dict[str, float]
    probabilities: dict[str, float]
    prompt_tokens: int


class Servable(Protocol):
    """What a served name answers with: a Model, a router over models (route/cascade.RoutedModel), or either behind a
    response cache (serve/hybrid.CachedModel). The server asks only this; what needs one model's own numbers
    (log-probabilities, token ids, a template's tool format, classification) asks `single`."""

    name: str

    @property
    def backend(self) -> Backend:  # tokenizes, counts and embeds for this name
        ...

    @property
    def single(self) -> "Model | None":  # the one model behind every answer; None where another may answer (routed)
        ...

    def stream_chat(self, messages: Sequence[Message], **sampling: Any) -> TextStream: ...

    def stream(self, prompt: str | Sequence[int], **sampling: Any) -> TextStream: ...

    def count_tokens(self, text: str) -> int: ...

    def count_chat(self, messages: Sequence[Message]) -> int: ...


class Model:
    """A model from the store, bound to an inference backend (a Servable: its own `single`)."""

    def __init__(self, name: str, backend: Backend, card: ModelCard | None = None) -> None:
        self.name = name
        self.backend = backend
        self.card = card
        # a preset (sources/modelfile.py: from a Modelfile, /api/create or an Ollama pull): the system prompt, earlier
        # messages and sampling defaults used where a request does not give its own
        self.preset: dict[str, Any] = dict(card.settings.get(PRESET_KEY) or {}) if card is not None else {}

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={self.backend.name!r})"

    def domain_weights(self, gen: "Generation") -> dict[str, float] | None:
        """A mixture's weights of its specialists after the prompt and the answer (`slmkit mix`), by specialist
        name; None for a model that is not a mixture. Scores the whole text once more (on the server, between
        decode steps on the scheduler's thread)."""
        served = isinstance(self.backend, BatchedBackend)
        engine = self.backend.inner if served else self.backend
        if not isinstance(engine, MixtureBackend) or not isinstance(gen, Generation):  # (a cached answer: none)
            return None
        ids = list(gen.prompt_ids) + [s.token for s in gen.steps]
        return self.backend.scheduler.call(lambda: engine.weights(ids)) if served else engine.weights(ids)

    # ---- generation -------------------------------------------------------------------------------
    def _params(self, sampling: dict[str, Any]) -> SamplingParams:
        """Sampling settings; `response_format` (OpenAI's: json_object, json_schema) becomes this sequence's grammar."""
        defaults = dict(self.preset.get("options") or {})
        if "stop" in defaults:
            defaults["stop"] = tuple(defaults["stop"])
        sampling = {**defaults, **sampling}
        response_format = sampling.pop("response_format", None)
        constraint = constraint_for(self.backend, response_format) if response_format else None
        return SamplingParams.from_kwargs(**sampling, constraint=constraint)

    def stream(self, prompt: str | Sequence[int], **sampling: Any) -> Generation:
        """Plain completion (no chat template), streamed as text pieces; the prompt is text, or token ids as they are."""
        params = self._params(sampling)
        ids = self.backend.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else self.checked_token_ids(prompt)
        return Generation(self, self._checked_ids(ids, params), params)

    def checked_token_ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids given by a caller, each in this model's vocabulary."""
        vocab = self.backend.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise SlmkitError(f"token id {bad[0]!r} is outside {self.name}'s vocabulary of {vocab} tokens",
                              "Send ids from this model's tokenizer (POST /tokenize), or text.")
        return list(ids)

    def generate(self, prompt: str, **sampling: Any) -> str:
        return self.stream(prompt, **sampling).read()

    def stream_chat(self, messages: Sequence[Message], *, tools: Sequence[dict[str, Any]] | None = None, prefill: str = "",
                    **sampling: Any) -> Generation:
        """Answer the last message of a conversation, formatted with the model's chat template: with `tools` (OpenAI's
        function tools) rendered by the template's own tools section; `prefill` is text the answer starts with (the
        template's call marker when a call is required: it is part of the prompt, not of the answer)."""
        _check_messages(messages)
        params = self._params(sampling)
        ids = encode_chat(self.backend, self.with_preset(messages), tools)
        if prefill:
            ids += self.backend.encode(prefill, add_special_tokens=False)
        return Generation(self, self._checked_ids(ids, params), params)

    def with_preset(self, messages: Sequence[Message]) -> list[Message]:
        """The conversation with the preset's system prompt (unless it has its own) and earlier messages before it."""
        msgs = list(messages)
        if not self.preset:
            return msgs
        own = bool(msgs) and msgs[0].get("role") == "system"
        system = self.preset.get("system")
        head = msgs[:1] if own else [{"role": "system", "content": system}] if system else []
        return head + list(self.preset.get("messages") or []) + msgs[1 if own else 0:]

    def chat(self, messages: Sequence[Message], **sampling: Any) -> str:
        return self.stream_chat(messages, **sampling).read()

    def count_tokens(self, text: str) -> int:
        return len(self.backend.encode(text, add_special_tokens=True))

    def count_chat(self, messages: Sequence[Message]) -> int:
        """The prompt tokens of a conversation in the chat template (the preset's messages included)."""
        return len(encode_chat(self.backend, self.with_preset(messages)))

    @property
    def single(self) -> "Model":
        return self

    def _checked_ids(self, ids: list[int], params: SamplingParams) -> list[int]:
        ctx = self.backend.context_length
        if not ids:  # nothing to continue from (this model adds no start token of its own)
            raise SlmkitError("the prompt is empty: it encodes to no tokens", "Give some text for the model to continue.")
        if len(ids) >= ctx:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens, but {self.name}'s context window is {ctx} tokens",
                f"Shorten the prompt to at most {ctx - 1} tokens (fewer, to leave room for the answer).",
            )
        return ids

    def _pieces(
        self, prompt_ids: list[int], params: SamplingParams, stats: GenerationStats, steps: list[Step]
    ) -> Iterator[str]:
        """The text-level decode loop: ids from the backend -> text, cut at EOS, stop strings or the budget."""
        budget = min(params.max_tokens, self.backend.context_length - len(prompt_ids))
        decoder = IncrementalDecoder(self.backend.decode)
        stops = StopMatcher(params.stop)
        eos = self.backend.eos_token_ids
        start = time.perf_counter()
        stream = self.backend.stream_steps(prompt_ids, params, budget)
        try:
            for step in stream:
                token = step.token
                now = time.perf_counter()
                if stats.completion_tokens == 0:
                    stats.time_to_first_token_s = now - start
                stats.completion_tokens += 1
                stats.total_s = now - start
                stats.checks += step.checked > 0
                stats.drafted_tokens += step.checked
                stats.accepted_tokens += step.drafted
                steps.append(step)
                if token in eos:
                    stats.finish_reason = "stop"
                    break
                piece = stops.push(decoder.push(token))
                if piece:
                    yield piece
                if stops.stopped:
                    stats.finish_reason = "stop"
                    break
            else:
                stats.finish_reason = "length"
            tail = stops.flush()
            if tail:
                yield tail
        finally:
            stream.close()
            stats.total_s = time.perf_counter() - start

    # ---- classification ---------------------------------------------------------------------------
    def label_task(self, labels: Sequence[str] | None = None, prompt_format: str | None = None) -> tuple[list[str], str]:
        """The labels and prompt format a classification uses: those given, else the model's own (its card's
        classify task), else (format) "chat" where the model has a chat template and "plain" where it has none."""
        task = task_of(self.card.settings if self.card else None) or {}
        chosen = check_labels(list(labels if labels is not None else task.get("labels") or []))
        return chosen, check_format(prompt_format or task.get("prompt_format") or ("chat" if self.backend.has_chat_template else "plain"))

    def classify(self, prompt: str | Sequence[Message], labels: Sequence[str] | None = None,
                 prompt_format: str | None = None) -> Classification:
        """The label the model finds likeliest as the answer to `prompt` (a text, or the messages before the answer):
        each label's score is the sum of its tokens' log-probabilities and the end of the answer after it (so a label
        that begins a longer one is not favoured), the prompt computed once for all labels. Always one of the labels.

        `labels` and `prompt_format` default to what the model was fine-tuned with (its card's classify task), else
        the model's chat template ("chat") or, without one, "plain" (data/classify.py)."""
        labels, fmt = self.label_task(labels, prompt_format)
        b = self.backend
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        _check_messages(messages)
        if fmt == "chat":
            if not b.has_chat_template:
                raise SlmkitError(f"{self.name} has no chat template", "Use prompt_format 'plain' (a base model).")
            prefix, answers = encode_chat(b, messages), list(labels)
        else:
            text = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
            prefix, answers = b.encode(plain_prompt(text), add_special_tokens=True), [plain_answer(x) for x in labels]
        end = sorted(b.eos_token_ids)[:1]  # the answer ends after the label
        continuations = [b.encode(a, add_special_tokens=False) + end for a in answers]
        if len(prefix) + max(map(len, continuations)) > b.context_length:
            raise PromptTooLong(f"the prompt is {len(prefix)} tokens, too long for {self.name}'s context of {b.context_length}",
                                "Shorten the text.")
        scores = [sum(lps) for lps in b.score_continuations(prefix, continuations)]
        top = max(scores)
        weights = [math.exp(x - top) for x in scores]
        total = sum(weights)
        probs = [w / total for w in weights]
        best = max(range(len(labels)), key=scores.__getitem__)
        return Classification(labels[best], dict(zip(labels, scores)), dict(zip(labels, probs)), len(prefix))

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, text: str, context: str = "") -> Score:
        """Log-probability of each token of `text`, given `context` (or the start of a document).

        Tokens are split as lm-evaluation-harness does (see engine/scoring.py): with a context, the tokens past
        the context's own encoding are scored; without one, the first token is conditioned on the tokenizer's
        BOS if it adds one, else on an EOS token.
        """
        if not text:
            raise SlmkitError("nothing to score: the text is empty", "Pass a non-empty text.")
        b = self.backend
        ids, start = encode_pair(b, context, text) if context else encode_document(b, text)
        if len(ids) > b.context_length:
            raise PromptTooLong(
                f"the text is {len(ids)} tokens, but {self.name}'s context window is {b.context_length} tokens",
                "Score a shorter text, or split it into windows.",
            )
        scored = ids[start:]
        return Score(token_ids=scored, tokens=[b.token_text(i) for i in scored], logprobs=b.score_batch([(ids, start)])[0])


def encode_chat(backend: Backend, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """The token ids of a conversation in the model's chat template, where only the template makes control tokens:
    each message's text is encoded with special-token strings read as plain text, so a user cannot forge a turn
    by writing <|im_end|><|im_start|>system inside a message. The template is rendered with a placeholder per
    message and split there; a template that transforms the text (so a placeholder does not come through intact)
    falls back to the whole rendered string."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    rendered = backend.render_chat([{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt=True, tools=tools)
    where = [rendered.find(mark) for mark in marks]
    if (any(rendered.count(mark) != 1 for mark in marks) or where != sorted(where)
            or any(_PLACEHOLDER_CHARS & set(m["content"]) for m in messages)):
        return backend.encode(backend.render_chat(messages, add_generation_prompt=True, tools=tools), add_special_tokens=False)
    ids: list[int] = []
    rest = rendered
    for mark, m in zip(marks, messages):
        before, _, rest = rest.partition(mark)
        if before:
            ids += backend.encode(before, add_special_tokens=False)  # template text: control tokens parsed
        if m["content"]:
            ids += backend.encode(m["content"], add_special_tokens=False, parse_special=False)
    if rest:
        ids += backend.encode(rest, add_special_tokens=False)
    return ids


_PLACEHOLDER_CHARS = {"\ue000", "\ue001"}


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise SlmkitError("no messages to answer", "Pass a list like [{'role': 'user', 'content': 'Hello'}].")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SlmkitError(
                f"message {i} is not a {{'role': str, 'content': str}} dict: {m!r}",
                "Each message needs a 'role' (system, user or assistant) and a 'content' string.",
            )
