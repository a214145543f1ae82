"""OpenAI's Responses API (/v1/responses) as pure conversions to and from the chat completions slmkit serves:
a request becomes a chat request (instructions as the system message, input items as messages, flat function tools
as chat tools, `text.format` as `response_format`); the chat answer becomes output items (a message, or function
calls); a stream of chat chunks becomes the Responses event stream (`EventStream`). No I/O, no models."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmkit.errors import Unsupported


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or parts of input_text / output_text (anything else is refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unsupported(f"{where}: content must be a string or a list of parts", "Send text.")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise Unsupported(f"{where}: content of type {kind!r}: the models served here read text only", "Send input_text parts.")
        texts.append(str(part.get("text") or ""))
    return "".join(texts)


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as chat messages (OpenAI chat's shape): messages by role, function calls as an assistant
    turn with tool_calls, function call outputs as tool messages."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise Unsupported(f"{where} is not an object", "Send messages and function call items.")
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise Unsupported(f"{where}: role {role!r} is not supported", "Use user, system, developer or assistant.")
            out.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id") or ""), "type": "function",
                    "function": {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                        "content": output if isinstance(output, str) else _text_of(output, where)})
        else:
            raise Unsupported(f"{where}: items of type {kind!r} are not supported here",
                              "Send messages, function_call and function_call_output items.")
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The Responses API's flat function tools as chat tools ({type, function: {name, description, parameters}})."""
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else t
            raise Unsupported(f"tools[{i}]: tools of type {kind!r} are not supported here (built-in tools run at OpenAI)",
                              "Send function tools.")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's response_format (the Responses API puts name and schema beside the type)."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt.get("schema")}}
    raise Unsupported(f"text.format type {kind!r} is not supported", "Use text, json_object or json_schema.")


def chat_body(req: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat completions request for this Responses request: its instructions, the earlier turns (of the previous
    response), its input; streamed with a usage chunk where it is streamed."""
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history + input_messages(req)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream, "user": req.user}
    for key, value in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature), ("top_p", req.top_p),
                       ("tools", chat_tools(req.tools)), ("tool_choice", chat_tool_choice(req.tool_choice)),
                       ("response_format", response_format(req.text))):
        if value is not None:
            body[key] = value
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call: dict[str, Any], status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call.get("id") or new_id("call"),
            "name": fn.get("name"), "arguments": fn.get("arguments") or "", "status": status}


def output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat answer (choices[0].message) as Responses output items."""
    if message.get("tool_calls"):
        return [call_item(c) for c in message["tool_calls"]]
    return [message_item(message.get("content") or "")]


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
            "total_tokens": chat_usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


def response_object(rid: str, model: str, req: ResponsesRequest, output: list[dict[str, Any]], *, status: str,
                    finish_reason: str | None = None, used: dict[str, Any] | None = None, created: int | None = None) -> dict[str, Any]:
    """The Response, with what the request set echoed back as OpenAI's does."""
    incomplete = status == "completed" and finish_reason == "length"
    return {"id": rid, "object": "response", "created_at": created or int(time.time()), "model": model,
            "status": "incomplete" if incomplete else status, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "text": req.text or {"format": {"type": "text"}},
            "metadata": req.metadata or {}, "store": req.store, "usage": usage(used)}


def as_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as the chat turns a later request (previous_response_id) continues from."""
    calls = [{"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
             for o in output if o["type"] == "function_call"]
    if calls:
        return [{"role": "assistant", "content": None, "tool_calls": calls}]
    return [{"role": "assistant", "content": "".join(c["text"] for o in output if o["type"] == "message" for c in o["content"])}]


class EventStream:
    """Chat completion chunks in, Responses stream events out (each with its sequence number): created and
    in_progress first; a message's item, part, text deltas and their done events, or a function call's item and
    arguments; completed (or incomplete) with the whole response last."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest) -> None:
        self.rid, self.model, self.req = rid, model, req
        self.created = int(time.time())
        self.seq = 0
        self.text: str | None = None  # the message's text so far (None: no message item opened)
        self.msg_id = new_id("msg")
        self.output: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.used: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return response_object(self.rid, self.model, self.req, output, status=status, finish_reason=self.finish,
                               used=self.used, created=self.created)

    def start(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=self._response("in_progress", [])),
                self.event("response.in_progress", response=self._response("in_progress", []))]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.used = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:  # a call arrives whole (the chat route replays it as one delta)
                item = call_item(call)
                index = len(self.output)
                events += [self.event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}),
                           self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"]),
                           self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=item["arguments"]),
                           self.event("response.output_item.done", output_index=index, item=item)]
                self.output.append(item)
            if delta.get("content"):
                if self.text is None:
                    events += self._open_message()
                self.text += delta["content"]
                events.append(self.event("response.output_text.delta", item_id=self.msg_id, output_index=len(self.output),
                                          content_index=0, delta=delta["content"], logprobs=[]))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        self.text = ""
        index = len(self.output)
        return [self.event("response.output_item.added", output_index=index, item=message_item("", "in_progress", self.msg_id)),
                self.event("response.content_part.added", item_id=self.msg_id, output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})]

    def end(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.text is None and not self.output:
            events += self._open_message()  # an empty answer is still a message
        if self.text is not None:
            index = len(self.output)
            item = message_item(self.text, "completed", self.msg_id)
            events += [self.event("response.output_text.done", item_id=self.msg_id, output_index=index, content_index=0,
                                   text=self.text, logprobs=[]),
                       self.event("response.content_part.done", item_id=self.msg_id, output_index=index, content_index=0,
                                   part=item["content"][0]),
                       self.event("response.output_item.done", output_index=index, item=item)]
            self.output.append(item)
        whole = self._response("completed", self.output)
        events.append(self.event("response.incomplete" if whole["status"] == "incomplete" else "response.completed", response=whole))
        return events
