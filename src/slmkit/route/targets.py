"""Where escalated requests go: another local model, or any OpenAI-compatible endpoint (sources/endpoint.py). Both
stream text pieces."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from slmkit.sources.endpoint import Message


@dataclass
class Local:
    """A model loaded in this process (a slmkit Model, or anything with its stream/stream_chat)."""

    model: Any

    @property
    def label(self) -> str:
        return str(self.model.name)

    def check(self) -> None:
        return None

    def stream_chat(self, messages: Sequence[Message], **kw: Any) -> Iterator[str]:
        gen = self.model.stream_chat(messages, **kw)
        try:
            yield from gen
        finally:
            gen.close()

    def stream(self, prompt: str, **kw: Any) -> Iterator[str]:
        gen = self.model.stream(prompt, **kw)
        try:
            yield from gen
        finally:
            gen.close()
