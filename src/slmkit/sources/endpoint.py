"""A model behind any OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp's server, slmkit's own, a cloud API),
through the official `openai` client: a router's large target (route/targets.py) and a black-box teacher that
writes training data (train/synthetic.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from slmkit.errors import SlmkitError

ENDPOINT_TIMEOUT_S = 30.0

Message = dict[str, str]


class TargetUnavailable(SlmkitError):
    pass


def _sampling(kw: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings an OpenAI endpoint understands, from slmkit's keyword arguments."""
    return {k: kw[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "response_format") if kw.get(k) is not None}


@dataclass
class Endpoint:
    """An OpenAI-compatible server at `url` (ending in /v1), asked for `model`."""

    url: str
    model: str | None = None
    api_key: str | None = None
    timeout: float = ENDPOINT_TIMEOUT_S

    def __post_init__(self) -> None:
        from openai import OpenAI

        if not self.url.startswith(("http://", "https://")):
            raise TargetUnavailable(f"{self.url!r} is not an http(s) URL", "Give the endpoint's base URL, for example http://127.0.0.1:11434/v1.")
        self.client = OpenAI(base_url=self.url.rstrip("/"), api_key=self.api_key or "none", timeout=self.timeout, max_retries=0)

    @property
    def label(self) -> str:
        return f"{self.url} ({self.model})" if self.model else self.url

    def check(self) -> None:
        """Fail now (a clear error) if the endpoint does not answer or does not serve the model; pick its first
        model when none was named."""
        try:
            served = [m.id for m in self.client.models.list().data]
        except Exception as exc:  # connection refused, time-out, 401: all mean "cannot escalate"
            raise TargetUnavailable(f"the large model's endpoint {self.url} does not answer: {type(exc).__name__}: {exc}"[:400],
                                    "Start it, fix --large, or serve small-only with --small-only.") from exc
        if self.model is None:
            if not served:
                raise TargetUnavailable(f"the endpoint {self.url} serves no models", "Name one with --large-model.")
            self.model = served[0]
        elif served and self.model not in served:
            raise TargetUnavailable(f"the endpoint {self.url} does not serve {self.model!r}", f"It serves: {', '.join(served)}.")

    def stream_chat(self, messages: Sequence[Message], **kw: Any) -> Iterator[str]:
        stream = self.client.chat.completions.create(model=self.model or "", messages=list(messages), stream=True, **_sampling(kw))  # type: ignore[arg-type]
        try:
            for chunk in stream:
                for c in chunk.choices:
                    if c.delta and c.delta.content:
                        yield c.delta.content
        finally:
            stream.close()

    def stream(self, prompt: str, **kw: Any) -> Iterator[str]:
        stream = self.client.completions.create(model=self.model or "", prompt=prompt, stream=True, **_sampling(kw))
        try:
            for chunk in stream:
                for c in chunk.choices:
                    if c.text:
                        yield c.text
        finally:
            stream.close()
