"""Ollama's model management on the server: /api/pull, /api/create (with files uploaded first through
/api/blobs/:digest, or a Modelfile), /api/copy and /api/delete. The model made is served at once (and a deleted one no
longer is). These change the store, so they are refused (403) unless the server has an API key or was started with
--allow-model-changes; pulls fetch from registries only (never a path on the server's disk), and create's FROM names
a served model or an uploaded blob.

Pull and create stream Ollama's progress lines ({"status", "digest", "total", "completed"}) as JSON lines, or answer
{"status": "success"} once done with stream false."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slmkit.errors import ModelNotFound, SlmkitError, Unsupported
from slmkit.serve import ollama_compat as ol
from slmkit.serve.errors import Refused
from slmkit.serve.registry import BadRequest
from slmkit.serve.routes import Server, identify
from slmkit.sources import blobs, modelfile
from slmkit.sources.pull import create, derive_copy, pull, ref_name

Report = Callable[[dict[str, Any]], None]


def manage_routes(server: Server, error: Callable[[BaseException], JSONResponse]) -> APIRouter:
    registry = server.registry
    router = APIRouter(dependencies=[Depends(identify)])

    def check_allowed() -> None:
        if not server.allow_changes:
            raise Refused("this server does not change its model store",
                          "Start it with --allow-model-changes (or with --api-key), or use the CLI: slmkit pull / models create / cp / rm.")

    async def progress(work: Callable[[Report], Any], stream: bool) -> Any:
        """Run `work(report)` in a thread; stream its report lines (then an error line if it fails), or wait for it."""
        try:
            check_allowed()
        except SlmkitError as exc:
            return error(exc)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        task = asyncio.ensure_future(asyncio.to_thread(work, lambda line: loop.call_soon_threadsafe(queue.put_nowait, line)))
        if not stream:
            try:
                await task
            except Exception as exc:
                return error(exc)
            return {"status": "success"}

        async def lines() -> AsyncIterator[bytes]:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield (json.dumps(get.result()) + "\n").encode()
                    continue
                get.cancel()
                while not queue.empty():
                    yield (json.dumps(queue.get_nowait()) + "\n").encode()
                if task.exception() is not None:
                    yield (json.dumps({"error": str(task.exception())}) + "\n").encode()
                return

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @router.post("/api/pull")
    async def pull_route(body: ol.PullRequest) -> Any:
        given = body.model or body.name or ""

        def work(report: Report) -> None:
            name = ref_name(given)
            if not registry.store.exists(name):
                pull(ol.pull_source(given, body.insecure), name, store=registry.store, report=report, local=False)
            else:  # already here: nothing to fetch (a changed tag is not looked for)
                report({"status": "success"})
            registry.add(name)

        return await progress(work, body.stream)

    @router.post("/api/create")
    async def create_route(body: ol.CreateRequest) -> Any:
        def work(report: Report) -> None:
            name = ol.model_name(body.model or body.name or "")
            if body.quantize:
                raise Unsupported(f"quantize {body.quantize!r}: models are quantized by slmkit's own stages here",
                                  "Create the model, then: slmkit quantize NAME (or slmkit export NAME --type Q4_K_M).")
            spec: dict[str, Any] = modelfile.parse(body.modelfile) if body.modelfile else {}
            given = {"from": body.from_, "system": body.system, "template": body.template, "license": body.license,
                     "parameters": body.parameters, "messages": body.messages, "adapter": body.adapters}
            spec.update({k: v for k, v in given.items() if v})
            staging = None
            try:
                if body.files:
                    if spec.get("from"):
                        raise BadRequest("give either files or from, not both", "Files make a new model; from starts from one.")
                    missing = [f for f, d in body.files.items() if not blobs.path_of(d).is_file()]
                    if missing:
                        raise BadRequest(f"{', '.join(missing)}: not uploaded", "Upload each file first: POST /api/blobs/sha256:DIGEST.")
                    if len(body.files) == 1 and next(iter(body.files)).lower().endswith(".gguf"):
                        spec["from"] = str(blobs.path_of(next(iter(body.files.values()))))
                    else:  # a Hugging Face folder, its files linked under their names
                        staging = blobs.blobs_dir() / f".create-{uuid.uuid4().hex[:8]}"
                        staging.mkdir(parents=True)
                        for fname, d in body.files.items():
                            if "/" in fname or fname.startswith("."):
                                raise BadRequest(f"file name {fname!r} is not a plain file name", "Name files without folders.")
                            (staging / fname).hardlink_to(blobs.path_of(d))
                        spec["from"] = str(staging)
                else:
                    base = str(spec.get("from") or "")
                    if base.startswith("@"):  # an older client's uploaded file
                        spec["from"] = str(blobs.path_of(base[1:]))
                    elif base:
                        spec["from"] = ol.model_name(base)
                        if not registry.store.exists(spec["from"]):
                            raise ModelNotFound(f"model {base!r} not found", "FROM names a model of this server, or a file uploaded as a blob.")
                report({"status": "creating model"})
                create(name, spec, store=registry.store)
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
            registry.add(name)
            report({"status": "success"})

        return await progress(work, body.stream)

    @router.post("/api/copy")
    async def copy_route(body: ol.CopyRequest) -> Any:
        try:
            check_allowed()
            src, dst = ol.model_name(body.source), ol.model_name(body.destination)
            await asyncio.to_thread(derive_copy, src, dst, store=registry.store)
            registry.add(dst)
        except Exception as exc:
            return error(exc)
        return Response(status_code=200)

    @router.delete("/api/delete")
    async def delete_route(request: Request) -> Any:
        try:
            check_allowed()
            raw = json.loads(await request.body() or b"{}")
            name = ol.model_name(str(raw.get("model") or raw.get("name") or ""))
            registry.store.require(name)
            if name in registry.names:
                await asyncio.to_thread(registry.drop, name)
            elif (why := registry.in_use(name)) is not None:
                raise BadRequest(f"{name} is {why} on this server", "Stop the server to remove it (slmkit models rm).")
            await asyncio.to_thread(registry.store.remove, name)
        except Exception as exc:
            return error(exc)
        return Response(status_code=200)

    @router.head("/api/blobs/{digest}")
    async def has_blob(digest: str) -> Any:
        try:
            check_allowed()
            return Response(status_code=200 if blobs.path_of(digest).is_file() else 404)
        except Exception as exc:
            return error(exc)

    @router.post("/api/blobs/{digest}")
    async def put_blob(digest: str, request: Request) -> Any:
        try:
            check_allowed()
            writer = blobs.BlobWriter(digest)
        except Exception as exc:
            return error(exc)
        try:
            async for chunk in request.stream():
                await asyncio.to_thread(writer.feed, chunk)
            await asyncio.to_thread(writer.finish)
        except Exception as exc:
            writer.abort()
            return error(exc)
        return Response(status_code=201)

    return router
