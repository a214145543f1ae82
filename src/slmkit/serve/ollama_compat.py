"""Ollama's native API wire format (/api/chat, /api/generate, /api/tags, ...): request models and pure conversions
to slmkit's sampling settings and back (no I/O, no models). Durations are nanoseconds, as Ollama's are."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmkit.card import human_count
from slmkit.engine.sampling import MAX_REPEAT_LAST_N
from slmkit.serve.limits import MAX_STOP
from slmkit.errors import ImportFailed, Unsupported
from slmkit.sources.modelfile import IGNORED_OPTIONS, OPTIONS
from slmkit.sources.pull import ref_name
from slmkit.serve.tools import call_text, native_call, result_text

TAG = ":latest"


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str = ""
    images: list[Any] | None = None



class Options(BaseModel):
    """Ollama's `options`, typed as Ollama types them (a wrong type is a 400 in Ollama's shape, never a 500); the
    ones about memory and threads are accepted and ignored, any other is refused (sampling())."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, strict=True)
    seed: int | None = Field(default=None, strict=True)
    num_predict: int | None = Field(default=None, ge=-2, strict=True)
    stop: str | list[str] | None = Field(default=None)
    repeat_penalty: float | None = Field(default=None, allow_inf_nan=False)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=MAX_REPEAT_LAST_N, strict=True)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)



class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = True
    options: Options = Field(default_factory=Options)
    format: Any = None
    keep_alive: Any = None


class ChatRequest(_Base):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Base):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[Any] | None = None



class EmbedRequest(BaseModel):
    model: str
    input: str | list[str]
    keep_alive: Any = None



class LegacyEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # older clients


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # older clients
    insecure: bool = False
    stream: bool = True


class CopyRequest(BaseModel):
    source: str
    destination: str


class CreateRequest(BaseModel):
    """Today's client sends structured fields (files and adapters uploaded first as blobs); older ones a Modelfile."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str | None = None
    name: str | None = None  # older clients
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    modelfile: str | None = None
    stream: bool = True


def pull_source(model: str, insecure: bool) -> str:
    """What /api/pull fetches: the name as given; `insecure` lets a registry on an explicit host speak plain HTTP."""
    first = model.split("/", 1)[0]
    explicit_host = "/" in model and ("." in first or ":" in first or first == "localhost")
    return f"http://{model}" if insecure and explicit_host and "://" not in model else model


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(keep_alive: Any) -> float | None:
    """Ollama's keep_alive as seconds: a number of seconds or a Go duration ("5m", "1h30m", "0"); negative keeps
    the model loaded for good (inf); None when none is given; what is not a duration is a 400."""
    if keep_alive is None:
        return None
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return math.inf if keep_alive < 0 else float(keep_alive)
    text = keep_alive.strip() if isinstance(keep_alive, str) else None
    if text is not None:
        sign, body = (-1, text[1:]) if text.startswith("-") else (1, text)
        if body and body.replace(".", "", 1).isdigit():
            return math.inf if sign < 0 else float(body)
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return math.inf if sign < 0 else sum(float(n) * _UNIT_S[u] for n, u in parts)
    raise Unsupported(f"keep_alive {keep_alive!r} is not a duration", 'Give seconds (300), a duration ("5m", "1h30m"), 0 or -1.')


def unloads(keep_alive: Any) -> bool:
    """Whether a keep_alive asks to free the model now: 0, or a duration of zero ("0", "0s", "0m")."""
    return keep_alive_seconds(keep_alive) == 0


def capabilities(folder: Path | None) -> list[str]:
    """What /api/show says a model can do: completion, and tools where it has a chat template (/api/chat with tools
    works through it)."""
    if folder is None:
        return ["completion"]
    config = folder / "tokenizer_config.json"
    templated = (folder / "chat_template.jinja").is_file() or (config.is_file() and "chat_template" in json.loads(config.read_text()))
    return ["completion", "tools"] if templated else ["completion"]


def model_name(name: str) -> str:
    """Ollama clients name models NAME:TAG; slmkit's names have no tag (":latest" is dropped; another tag, a
    namespace or an hf.co/ repo name the model as `slmkit pull` / /api/pull stored it: NAME-TAG, REPO-QUANT)."""
    if name.endswith(TAG):
        name = name[: -len(TAG)]
    if ":" in name or "/" in name:
        try:
            return ref_name(name)
        except ImportFailed:
            return name
    return name


def sampling(req: _Base) -> dict[str, Any]:
    """slmkit sampling keyword arguments from Ollama's options; options that change what is computed and are not
    served are refused, the ones about memory and threads are ignored (the server's own settings decide)."""
    given = req.options.model_dump(exclude_none=True)
    unknown = sorted(set(given) - set(OPTIONS) - IGNORED_OPTIONS)
    if unknown:
        raise Unsupported(f"options not supported by this server: {', '.join(unknown)}",
                          f"Supported: {', '.join(OPTIONS)} (and {', '.join(sorted(IGNORED_OPTIONS))}, ignored).")
    out = {OPTIONS[k]: v for k, v in given.items() if k in OPTIONS}
    if len(out.get("stop") or ()) > MAX_STOP and not isinstance(out.get("stop"), str):
        raise Unsupported(f"{len(out['stop'])} stop strings: this server takes at most {MAX_STOP}", "Send fewer.")
    if isinstance(out.get("stop"), str):
        out["stop"] = (out["stop"],)
    elif "stop" in out:
        out["stop"] = tuple(out["stop"])
    if out.get("max_tokens") is not None and out["max_tokens"] < 0:  # -1: as long as the context allows
        del out["max_tokens"]
    out.setdefault("repetition_penalty", 1.0)
    if req.format == "json":  # Ollama's structured output: any JSON, or a JSON schema
        out["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": req.format}}
    elif req.format not in (None, ""):
        raise Unsupported(f"format {req.format!r} is not understood", 'Give "json" or a JSON schema object.')
    return out


def chat_messages(req: ChatRequest, native: bool = False) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it: earlier tool calls and tool results in serve/tools.py's text
    protocol, or (`native`, a template with a tools section) as the template takes them (Ollama's calls carry their
    arguments as an object; a result may name its tool in `tool_name`)."""
    out: list[dict[str, Any]] = []
    called = "the tool"
    for i, m in enumerate(req.messages):
        if m.images:
            raise Unsupported(f"messages[{i}] has images: the models served here read text only", "Send text only.")
        if m.role not in ("system", "user", "assistant", "tool"):
            raise Unsupported(f"messages[{i}]: role {m.role!r} is not supported here", "Use system, user, assistant or tool.")
        calls = (m.model_extra or {}).get("tool_calls") or [] if m.role == "assistant" else []
        if calls:
            called = str(((calls[-1] or {}).get("function") or {}).get("name") or called)
            out.append({"role": "assistant", "content": m.content, "tool_calls": [native_call(c) for c in calls]} if native
                       else {"role": "assistant", "content": "\n".join(call_text(c) for c in calls)})
        elif m.role == "tool":
            name = str((m.model_extra or {}).get("tool_name") or called)
            out.append({"role": "tool", "name": name, "content": m.content} if native
                       else {"role": "user", "content": result_text(name, m.content)})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped tool call (serve/tools.py's parse_call) in Ollama's shape: the arguments as an object."""
    fn = call["function"]
    return {"function": {"name": fn["name"], "arguments": json.loads(fn["arguments"])}}


def iso_time(t: float | None) -> str:
    """A wall-clock time as Ollama writes it (RFC 3339, UTC); None: far in the future (a model that stays loaded)."""
    if t is None:
        return "9999-12-31T23:59:59Z"
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def final_fields(stats: Any, total_ns: int) -> dict[str, Any]:
    """The counts and durations Ollama's last streamed object (or its whole answer) carries."""
    first = int(stats.time_to_first_token_s * 1e9)
    return {"done": True, "done_reason": "length" if stats.finish_reason == "length" else "stop",
            "total_duration": total_ns, "load_duration": 0, "prompt_eval_count": stats.prompt_tokens,
            "prompt_eval_duration": first, "eval_count": stats.completion_tokens,
            "eval_duration": max(0, int(stats.total_s * 1e9) - first)}


def details(card: Any, engine: str | None = None) -> dict[str, Any]:
    """Ollama's `details` of a model from its card, for the weights the engine that serves it runs: the GGUF (its
    quantization type) on llama.cpp, the safetensors (dtype or integer scheme) on PyTorch."""
    if card is None:
        return {"format": "", "family": "", "families": [], "parameter_size": "", "quantization_level": ""}
    settings = card.settings or {}
    gguf = engine == "llamacpp" or (engine is None and card.weights_bytes.get("gguf") and not card.weights_bytes.get("safetensors"))
    quant = (settings.get("source_quantization") or settings.get("type") or "") if gguf else (settings.get("scheme") or card.dtype)
    return {"format": "gguf" if gguf else "safetensors", "family": card.model_type, "families": [card.model_type],
            "parent_model": card.parent or "", "parameter_size": human_count(card.parameters) if card.parameters else "",
            "quantization_level": str(quant).upper()}


def served_size(card: Any, engine: str | None) -> int:
    """The bytes of the weights that run (the GGUF on llama.cpp, the safetensors on PyTorch), else the folder's."""
    if card is None:
        return 0
    kind = "gguf" if engine == "llamacpp" else "safetensors" if engine == "torch" else None
    return (card.weights_bytes.get(kind) if kind else None) or card.size_bytes


def client_name(name: str, card: Any) -> str:
    """The name Ollama's clients know a model by: NAME:TAG as it was pulled from a registry (model_name maps it back
    to the store's NAME-TAG), else NAME:latest."""
    pulled = (card.source or {}).get("model") if card is not None and (card.source or {}).get("kind") == "ollama" else None
    return pulled if pulled and model_name(pulled) == name else name + TAG


def tag_entry(name: str, card: Any, engine: str | None = None) -> dict[str, Any]:
    digest = ""
    if card is not None and card.files:
        digest = sorted(card.files.values())[0]
    shown = client_name(name, card)
    return {"name": shown, "model": shown, "modified_at": (card.created if card else "") or now(),
            "size": served_size(card, engine), "digest": digest, "details": details(card, engine)}
