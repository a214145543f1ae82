"""OpenAI's Responses API (POST /v1/responses, GET /v1/responses/{id}) over the chat completions route: each request
is converted to a chat request (responses_compat.py), answered by the same handler (models, batching, tools,
structured output, limits, metrics), and converted back; streamed chat chunks become Responses events as they come.
Responses are kept in memory (the last MAX_KEPT_RESPONSES) for `previous_response_id` and retrieval."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from slmkit.serve import openai_compat as oa
from slmkit.serve import responses_compat as rc
from slmkit.serve.errors import HTTPError, to_http
from slmkit.serve.limits import MAX_KEPT_RESPONSES
from slmkit.serve.registry import BadRequest
from slmkit.serve.routes import Server, identify

ChatHandler = Callable[[oa.ChatRequest, Request], Awaitable[Any]]


def event_bytes(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def responses_routes(server: Server, chat: ChatHandler) -> APIRouter:
    registry = server.registry
    router = APIRouter(dependencies=[Depends(identify)])  # the API key: app.Boundary
    kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()  # id -> (response, its turns)

    def keep(req: rc.ResponsesRequest, response: dict[str, Any], turns: list[dict[str, Any]]) -> None:
        if req.store:
            kept[response["id"]] = (response, turns)
            while len(kept) > MAX_KEPT_RESPONSES:
                kept.popitem(last=False)

    @router.post("/v1/responses")
    async def create(body: rc.ResponsesRequest, request: Request) -> Any:
        name = body.model or registry.names[0]
        history: list[dict[str, Any]] = []
        try:
            if body.previous_response_id:
                if body.previous_response_id not in kept:
                    raise BadRequest(f"previous response {body.previous_response_id!r} not found",
                                     f"This server keeps its last {MAX_KEPT_RESPONSES} stored responses in memory, until it stops.")
                history = kept[body.previous_response_id][1]
            turns = history + rc.input_messages(body)  # what a later request continues (instructions are not carried)
            chat_req = oa.ChatRequest.model_validate(rc.chat_body(body, history))
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {}
            raise to_http(BadRequest(f"invalid request: {first.get('msg', 'bad value')}", "Fix the request.")) from None
        except Exception as exc:
            raise to_http(exc) from None
        rid = rc.new_id("resp")
        if not body.stream:
            whole = await chat(chat_req, request)
            choice = whole["choices"][0]
            output = rc.output_items(choice["message"])
            response = rc.response_object(rid, name, body, output, status="completed", finish_reason=choice["finish_reason"],
                                          used=whole.get("usage"))
            keep(body, response, turns + rc.as_messages(output))
            return response
        streamed = await chat(chat_req, request)
        stream = rc.EventStream(rid, name, body)

        async def events() -> AsyncIterator[bytes]:
            for e in stream.start():
                yield event_bytes(e)
            buffer = ""
            async for piece in streamed.body_iterator:
                buffer += piece.decode() if isinstance(piece, bytes) else piece
                while "\n\n" in buffer:
                    frame, buffer = buffer.split("\n\n", 1)
                    data = frame.removeprefix("data: ")
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:  # the generation failed midway
                        err = chunk["error"]
                        yield event_bytes(stream.event("error", code=err.get("code"), message=err.get("message"), param=None))
                        return
                    for e in stream.feed(chunk):
                        yield event_bytes(e)
            ending = stream.end()
            for e in ending:
                yield event_bytes(e)
            keep(body, ending[-1]["response"], turns + rc.as_messages(stream.output))

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str) -> Any:
        if response_id not in kept:
            raise HTTPError(404, oa.error_body(f"response {response_id!r} not found: this server keeps its last "
                                               f"{MAX_KEPT_RESPONSES} stored responses in memory, until it stops", code="not_found"))
        return kept[response_id][0]

    return router
