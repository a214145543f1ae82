"""OpenAI wire format: request models and pure conversions to and from slmkit's types (no I/O, no models)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmkit.errors import Unsupported
from slmkit.serve.limits import MAX_CHOICES, MAX_LABELS, MAX_STOP
from slmkit.serve.tools import call_text, native_call, result_text


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None



class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: checked in plain_messages

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None



def plain_messages(messages: list[Message], native: bool = False) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: text content parts joined, `developer` as `system` (OpenAI's newer
    name for it), earlier tool calls and tool results in serve/tools.py's text protocol, or (`native`, for a template
    with a tools section) as the template takes them: assistant `tool_calls` with their arguments as objects, `tool`
    messages with the function's name; images and audio refused."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    for i, m in enumerate(messages):
        calls = getattr(m, "tool_calls", None) or []
        if m.role == "assistant" and calls:
            for c in calls:
                names[str(c.get("id"))] = str((c.get("function") or {}).get("name"))
            if native:
                out.append({"role": "assistant", "content": m.content if isinstance(m.content, str) else "",
                            "tool_calls": [native_call(c) for c in calls]})
            else:
                out.append({"role": "assistant", "content": "\n".join(call_text(c) for c in calls)})
            continue
        if m.role == "tool":
            call_id = str(getattr(m, "tool_call_id", ""))
            name = names.get(call_id, "the tool")
            text = m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])
            out.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": text} if native
                       else {"role": "user", "content": result_text(name, text)})
            continue
        if isinstance(m.content, list):
            kinds = sorted({p.type for p in m.content if p.type != "text"})
            if kinds:
                raise Unsupported(f"messages[{i}]: content of type {', '.join(kinds)}: the models served here read text only",
                                  "Send the text parts only.")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)  # strict: no true-as-1, no "5"-as-5
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, strict=True)  # its range is SamplingParams' (a clear 400 outside it)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8, strict=True)
    stream: bool = False
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    user: str | None = Field(default=None, max_length=256)  # the A/B split's sticky key
    top_k: int | None = Field(default=None, ge=0, strict=True)  # not OpenAI's; vLLM's and llama.cpp's servers take it
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    stream_options: dict[str, Any] | None = None
    # fields this server does not serve yet are refused when they ask for anything (refused_fields)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # vLLM's and llama.cpp's servers take it
    # slmkit's own: drafts by prompt lookup checked per step (0: off; unset: the server's --speculative)
    speculative: int | None = Field(default=None, ge=0, le=16, strict=True)


    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"{len(value)} stop strings: this server takes at most {MAX_STOP}")
        return value


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids, lists of token ids (OpenAI's forms)
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)  # the legacy endpoint's logprobs is a count


    @model_validator(mode="after")
    def _choices(self) -> "CompletionRequest":
        prompts = len(prompt_list(self.prompt))
        if prompts * self.n > MAX_CHOICES:
            raise ValueError(f"{prompts} prompts x n={self.n} = {prompts * self.n} completions: this server makes at most "
                             f"{MAX_CHOICES} per request (send the prompts in several requests)")
        return self


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completion request's prompts (or an embedding request's inputs): one text, several, one list of token ids,
    or several."""
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    """llama-server's /tokenize (with a model name where several are served)."""

    model: str | None = None
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(BaseModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids, lists of token ids (OpenAI's forms)


class ClassifyRequest(BaseModel):
    """slmkit's /v1/classify (not OpenAI's): texts, each answered with the likeliest of the labels (default: the
    labels the model was fine-tuned on, `slmkit finetune --task classify`)."""

    model: str | None = None
    input: str | list[str]
    labels: list[str] | None = Field(default=None, max_length=MAX_LABELS)


def classification(index: int, label: str, probabilities: dict[str, float]) -> dict[str, Any]:
    return {"object": "classification", "index": index, "label": label, "probabilities": probabilities}



# ---- responses: typed shapes of what goes on the wire ---------------------------------------------------------
class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(TypedDict):
    error: dict[str, str | None]


class ChatMessageOut(TypedDict, total=False):
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]]


class ChatChoice(TypedDict):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(TypedDict, total=False):
    index: int
    delta: dict[str, Any]
    text: str
    finish_reason: str | None
    logprobs: None


class Chunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChunkChoice]


class CompletionChoice(TypedDict):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# ---- conversions -------------------------------------------------------------------------------------------------
def refused_fields(req: _Sampling) -> None:
    """Refuse (400) what a client asks for that this server would otherwise ignore."""
    asked = [f for f in ("functions", "logit_bias") if getattr(req, f)]
    asked += [f for f in ("function_call",) if getattr(req, f) not in (None, "none", "auto")]
    if asked:
        raise Unsupported(f"not supported by this server yet: {', '.join(asked)}",
                          "Leave them out, or use a server that has them.")


def include_usage(req: _Sampling) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.get("include_usage"))


def sampling_kwargs(req: _Sampling, index: int) -> dict[str, Any]:
    """Sampling settings for choice `index` (seeded choices get seed + index so that n > 1 differ)."""
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    out: dict[str, Any] = {
        "temperature": req.temperature, "top_p": req.top_p, "max_tokens": req.max_completion_tokens or req.max_tokens,
        "stop": tuple(stop) or None, "seed": None if req.seed is None else req.seed + index,
        # OpenAI applies no repetition penalty unless asked
        "repetition_penalty": req.repetition_penalty or 1.0, "top_k": req.top_k, "min_p": req.min_p,
        "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
        "response_format": req.response_format if (req.response_format or {}).get("type", "text") != "text" else None,
        "top_logprobs": top_logprobs_of(req), "speculative": req.speculative,
    }
    return {k: v for k, v in out.items() if v is not None}


def top_logprobs_of(req: _Sampling) -> int | None:
    """How many alternatives each token reports: chat's top_logprobs (with logprobs true), the legacy endpoint's
    logprobs count; None when logprobs are not asked for."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs  # CompletionRequest: a count, or None


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> ErrorBody:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, choices: list[ChatChoice], use: Usage) -> ChatCompletion:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices, "usage": use}


def chat_choice(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> ChatChoice:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": logprobs}


def usage_chunk(rid: str, model: str, object_: str, use: Usage) -> dict[str, Any]:
    """The last streamed chunk when stream_options.include_usage is set: no choices, the request's usage."""
    return {"id": rid, "object": object_, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any], finish: str | None) -> Chunk:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, choices: list[CompletionChoice], use: Usage) -> Completion:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices, "usage": use}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> CompletionChoice:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def completion_chunk(rid: str, model: str, index: int, text: str, finish: str | None) -> Chunk:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_logprobs(tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]) -> dict[str, Any]:
    """The chat endpoint's logprobs object: one entry per generated token, with its top alternatives."""
    def entry(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in top]) for t, lp, top in zip(tokens, logprobs, tops)],
            "refusal": None}


def completion_logprobs(tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]) -> dict[str, Any]:
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": [dict(top) for top in tops], "text_offset": offsets}
