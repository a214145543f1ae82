"""Ollama's Modelfile and model parameters, read into a preset: the system prompt, earlier messages and sampling
defaults a store model applies when a request does not say otherwise (card settings["preset"]; Model reads it).

Pure: text and dicts in, dicts out. The instructions read are FROM, SYSTEM, PARAMETER, MESSAGE, LICENSE, and
TEMPLATE / ADAPTER only to refuse them clearly (slmkit formats chats with the model's own Jinja chat template, and makes
adapters with `slmkit finetune`): nothing in a Modelfile is silently dropped."""

from __future__ import annotations

import re
from typing import Any

from slmkit.errors import Unsupported

PRESET_KEY = "preset"  # card.settings[PRESET_KEY] = {"system", "messages", "options", "license"}
# Ollama's option names -> slmkit's sampling keyword arguments (Model.stream's)
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed", "num_predict": "max_tokens",
           "stop": "stop", "repeat_penalty": "repetition_penalty", "repeat_last_n": "repeat_last_n", "min_p": "min_p",
           "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}
# about memory, threads and devices: the server's or the command's own settings decide
IGNORED_OPTIONS = {"num_ctx", "num_thread", "num_gpu", "num_batch", "use_mmap", "use_mlock", "numa", "main_gpu", "low_vram", "num_keep"}
INT_OPTIONS = {"top_k", "seed", "num_predict", "repeat_last_n", "num_ctx", "num_thread", "num_gpu", "num_batch", "main_gpu", "num_keep"}
ROLES = ("system", "user", "assistant")


def parse(text: str) -> dict[str, Any]:
    """A Modelfile -> {"from", "system", "template", "adapter", "license", "parameters": {name: value or [values]},
    "messages": [{"role", "content"}]}; a line it cannot read is an error naming the line."""
    out: dict[str, Any] = {"parameters": {}, "messages": []}
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        stripped, line_no = lines[i].strip(), i + 1
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        word, arg = (re.split(r"\s+", stripped, maxsplit=1) + [""])[:2]
        key = word.upper()
        head = ""
        if key in ("PARAMETER", "MESSAGE"):  # a name or role, then the value
            head, arg = (re.split(r"\s+", arg, maxsplit=1) + [""])[:2]
        if arg.startswith('"""'):  # a block that may span lines
            body = arg[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise Unsupported(f'Modelfile line {line_no}: {key}\'s """ block is not closed', 'End it with """.')
                body += "\n" + lines[i]
                i += 1
            value = body.split('"""', 1)[0]
        else:
            value = arg[1:-1] if len(arg) >= 2 and arg[0] == arg[-1] == '"' else arg
        if key in ("FROM", "SYSTEM", "TEMPLATE", "ADAPTER", "LICENSE"):
            out[key.lower()] = value
        elif key == "PARAMETER":
            if not head or not value:
                raise Unsupported(f"Modelfile line {line_no}: PARAMETER needs a name and a value", "Write PARAMETER NAME VALUE.")
            if head == "stop":
                out["parameters"].setdefault("stop", []).append(value)
            else:
                out["parameters"][head] = value
        elif key == "MESSAGE":
            out["messages"].append({"role": head, "content": value})
        else:
            raise Unsupported(f"Modelfile line {line_no}: unknown instruction {word!r}",
                              "Use FROM, SYSTEM, PARAMETER, MESSAGE or LICENSE.")
    if not out.get("from"):
        raise Unsupported("the Modelfile has no FROM line", "Start it with FROM MODEL (a store model, a .gguf file or a folder).")
    return out


def _typed(name: str, value: Any) -> Any:
    if name == "stop":
        return list(value if isinstance(value, (list, tuple)) else [value])
    if isinstance(value, str):
        try:
            value = int(value) if name in INT_OPTIONS else float(value)
        except ValueError:
            raise Unsupported(f"parameter {name} = {value!r} is not a number", f"Give {name} a number.") from None
    if name in INT_OPTIONS and (not isinstance(value, int) or isinstance(value, bool)):
        raise Unsupported(f"parameter {name} = {value!r} is not a whole number", f"Give {name} a whole number.")
    return value


def preset(*, system: str | None = None, parameters: dict[str, Any] | None = None, messages: list[dict] | None = None,
           license: str | list[str] | None = None, template: str | None = None, adapters: Any = None) -> dict[str, Any]:
    """What a new model keeps from a Modelfile or an /api/create request: {"system", "messages", "options" (slmkit
    sampling keyword arguments), "license"}, only the keys given."""
    if template:
        raise Unsupported("TEMPLATE: a Go template is not rendered here; slmkit formats chats with the model's own chat "
                          "template (tokenizer_config.json / the GGUF's)", "Leave TEMPLATE out.")
    if adapters:
        raise Unsupported("ADAPTER: adapters are not imported from files here",
                          "Train one with `slmkit finetune --method lora` (it is stored beside its base), or merge it first.")
    params = dict(parameters or {})
    unknown = sorted(set(params) - set(OPTIONS) - IGNORED_OPTIONS)
    if unknown:
        raise Unsupported(f"parameters not supported: {', '.join(unknown)}",
                          f"Supported: {', '.join(OPTIONS)} (and {', '.join(sorted(IGNORED_OPTIONS))}, ignored).")
    for i, m in enumerate(messages or []):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise Unsupported(f"message {i} needs a role ({', '.join(ROLES)}) and text content", "")
    out: dict[str, Any] = {}
    if system:
        out["system"] = system
    if messages:
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    options = {OPTIONS[k]: _typed(k, v) for k, v in params.items() if k in OPTIONS}
    if options:
        out["options"] = options
    if license:
        out["license"] = "\n".join(license) if isinstance(license, list) else license
    return out


def to_text(name_from: str, kept: dict[str, Any]) -> str:
    """A Modelfile that makes the same model again (what /api/show answers)."""
    back = {v: k for k, v in OPTIONS.items()}
    lines = [f"FROM {name_from}"]
    if "system" in kept:
        lines.append(f'SYSTEM """{kept["system"]}"""')
    for k, v in (kept.get("options") or {}).items():
        for one in (v if isinstance(v, (list, tuple)) else [v]):
            lines.append(f'PARAMETER {back.get(k, k)} "{one}"' if isinstance(one, str) else f"PARAMETER {back.get(k, k)} {one}")
    for m in kept.get("messages") or []:
        lines.append(f'MESSAGE {m["role"]} """{m["content"]}"""')
    if "license" in kept:
        lines.append(f'LICENSE """{kept["license"]}"""')
    return "\n".join(lines) + "\n"
