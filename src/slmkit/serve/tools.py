"""Tool calling. Where the model's chat template has a tools section, through it (the template's own format; see
NATIVE below); for models whose template knows nothing of tools (most small ones), by a text-level protocol:

- the tools are described in the system message, with how to call one: answer with only a JSON object
  `{"name": NAME, "arguments": {...}}`;
- `tool_choice` "required" or a named function constrains the answer to such a call by grammar (llguidance,
  engine/constrained.py), so it is always well-formed and names a real tool with schema-valid arguments; "auto"
  lets the model choose, and an answer that parses as a call to a known tool becomes one;
- earlier calls (assistant `tool_calls`) go back into the conversation as that JSON, and tool results (`tool`
  messages) as a user turn "Result of NAME: ...".
With a template's own tools section, the tools, earlier calls and results are rendered by the template, a required
call starts with the family's marker (given as the start of the answer) and its JSON is held to the tools' schemas,
and an answer's calls are read in the family's format (several in one answer too).
Pure conversions; the routes use them around one generation."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from slmkit.errors import Unsupported

CALL_FORMAT = '{"name": "<function name>", "arguments": {<arguments as JSON>}}'
# chat templates with a tools section, by the marker their models write a call with: Hermes / Qwen2.5 / Qwen3 /
# SmolLM3 (<tool_call>{json}</tool_call>), Mistral ([TOOL_CALLS][{json}, ...]), Llama 3.1-3.3 (a bare JSON object
# {"name", "parameters"}, maybe after <|python_tag|>)
NATIVE = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}
CALL_PREFIX = {"hermes": "<tool_call>\n", "mistral": "[TOOL_CALLS]", "llama3": ""}
ARGS_KEY = {"hermes": "arguments", "mistral": "arguments", "llama3": "parameters"}


def check_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """OpenAI's `tools` as [{name, description, parameters}], checked."""
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Unsupported(f"tools[{i}] is not a function tool {{type: function, function: {{name, parameters}}}}", "Fix the tool.")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise Unsupported(f"tools[{i}].function.parameters must be a JSON schema object", "Fix the tool.")
        out.append({"name": fn["name"], "description": str(fn.get("description") or ""), "parameters": params})
    return out


def mode_of(tool_choice: Any, tools: list[dict[str, Any]], after_result: bool = False) -> str | None:
    """None (no tools), "none", "auto", "required", or the name of the one function to call. `after_result` (the
    conversation ends with a tool's result): auto becomes none, so the model answers with the result in text instead
    of calling again (a small model tends to repeat the call); required or a named function still call."""
    if not tools or tool_choice == "none":
        return None if not tools else "none"
    if tool_choice in (None, "auto") and after_result:
        return "none"
    if tool_choice in (None, "auto", "required"):
        return tool_choice or "auto"
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in {t["name"] for t in tools}:
        raise Unsupported(f"tool_choice names {name!r}, which is not among the tools", "Name one of the tools, or use auto.")
    return name


def system_text(tools: list[dict[str, Any]], mode: str) -> str:
    lines = ["You can call these functions:"]
    for t in tools:
        lines.append(f"- {t['name']}: {t['description']} Parameters (JSON schema): {json.dumps(t['parameters'])}")
    lines.append(f"To call a function, answer with only a JSON object: {CALL_FORMAT}.")
    if mode == "required":
        lines.append("You must call one of the functions.")
    elif mode not in ("auto", "none"):
        lines.append(f"You must call {mode}.")
    return "\n".join(lines)


def call_schema(tools: list[dict[str, Any]], mode: str, family: str | None = None) -> dict[str, Any]:
    """The JSON schema of a call: one of the tools by name, its arguments by its parameters (under the key the
    template's family uses; Mistral's calls come as a list)."""
    key = ARGS_KEY.get(family or "", "arguments")
    chosen = [t for t in tools if mode == "required" or t["name"] == mode]
    variants = [{"type": "object", "properties": {"name": {"const": t["name"]}, key: t["parameters"]},
                 "required": ["name", key], "additionalProperties": False} for t in chosen]
    one = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {"type": "array", "items": one, "minItems": 1, "maxItems": 1} if family == "mistral" else one


def family_of(template: str | None) -> str | None:
    """The tool-call family of a chat template that has a tools section (NATIVE), or None: the text protocol."""
    if not template or "tools" not in template:
        return None
    return next((fam for fam, marker in NATIVE.items() if marker in template), None)


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked tools back in OpenAI's shape, as chat templates take them."""
    return [{"type": "function", "function": t} for t in tools]


def native_calls(family: str, text: str, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """An answer in a template family's format: (its text outside the calls, the calls as OpenAI's tool_calls). An
    answer whose calls do not parse, or name no tool given, is text with no calls."""
    if family == "hermes":
        found = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, flags=re.S)
        content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.S).strip()
    elif family == "mistral":
        head, marker, rest = text.partition(NATIVE["mistral"])
        found, content = ([rest.strip()] if marker else []), head.strip()
    else:
        body = text.strip().removeprefix(NATIVE["llama3"]).strip()
        found, content = ([body] if body.startswith("{") else []), ""
    objs: list[Any] = []
    try:
        for raw in found:
            parsed = json.loads(raw)
            objs += parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        return text, []
    names = {t["name"] for t in tools}
    calls = []
    for obj in objs:
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(args, dict):
            return text, []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args)}})
    return (content if calls else text), calls


def with_tools(messages: list[dict[str, str]], tools: list[dict[str, Any]], mode: str | None) -> list[dict[str, str]]:
    """The conversation with the tools described in its system message."""
    if not mode or mode == "none":
        return messages
    text = system_text(tools, mode)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_text(call: dict[str, Any]) -> str:
    """An earlier assistant tool call written as the model would have written it."""
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        parsed = args
    return json.dumps({"name": fn.get("name"), "arguments": parsed})


def calls_in(text: str, tools: list[dict[str, Any]], mode: str | None, family: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The calls in an answer (none unless a call may be made): (its text outside the calls, OpenAI's tool_calls). A
    required call's answer started after the family's marker, which is put back before reading it."""
    if mode in (None, "none"):
        return text, []
    if family:
        return native_calls(family, (CALL_PREFIX[family] if mode != "auto" else "") + text, tools)
    call = parse_call(text, tools)
    return ("", [call]) if call else (text, [])


def native_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier assistant tool call as chat templates take it: the arguments as an object, not a JSON string."""
    fn = call.get("function") or {}
    args = fn.get("arguments") or {}
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        pass
    return {"id": call.get("id"), "type": "function", "function": {"name": fn.get("name"), "arguments": args}}


def result_text(name: str, content: str) -> str:
    """A tool's result as the user turn that carries it back to the model."""
    return f"Result of {name}: {content}"


def parse_call(text: str, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An answer that is a call to one of the tools, as OpenAI's tool_calls entry; else None."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in {t["name"] for t in tools} or not isinstance(obj.get("arguments", {}), dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}))}}
