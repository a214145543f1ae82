"""Text handling over a transformers tokenizer (encode, decode, the chat template): what the PyTorch engine and the
n-gram engine share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slmkit.errors import SlmkitError


class HfText:
    """Mixed into a backend that keeps its transformers tokenizer as `self.tokenizer`."""

    tokenizer: Any

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=not parse_special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        if not self.has_chat_template:
            raise SlmkitError(
                "this model has no chat template (it is probably a base model)",
                "Use plain completion instead: slmkit run --raw, or Model.generate().",
            )
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, tools=list(tools) if tools else None
        )
