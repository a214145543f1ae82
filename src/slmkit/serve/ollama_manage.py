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
from pathlib import Path
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


class ManageApi:
    """Ollama's model management on one server, a method per endpoint (manage_routes mounts them); every one is
    refused unless the server allows changes."""

    def __init__(self, server: Server, error: Callable[[BaseException], JSONResponse]) -> None:
        self.server, self.registry, self.error = server, server.registry, error

    def check_allowed(self) -> None:
        if not self.server.allow_changes:
            raise Refused("this server does not change its model store",
                          "Start it with --allow-model-changes (or with --api-key), or use the CLI: slmkit pull / models create / cp / rm.")

    async def progress(self, work: Callable[[Report], Any], stream: bool) -> Any:
        """Run `work(report)` in a thread; stream its report lines (then an error line if it fails), or wait for it."""
        try:
            self.check_allowed()
        except SlmkitError as exc:
            return self.error(exc)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        task = asyncio.ensure_future(asyncio.to_thread(work, lambda line: loop.call_soon_threadsafe(queue.put_nowait, line)))
        if not stream:
            try:
                await task
            except Exception as exc:
                return self.error(exc)
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

    async def pull(self, body: ol.PullRequest) -> Any:
        given, store = body.model or body.name or "", self.registry.store

        def work(report: Report) -> None:
            name = ref_name(given)
            if not store.exists(name):
                pull(ol.pull_source(given, body.insecure), name, store=store, report=report, local=False)
            else:  # already here: nothing to fetch (a changed tag is not looked for)
                report({"status": "success"})
            self.registry.add(name)

        return await self.progress(work, body.stream)

    def from_files(self, files: dict[str, str]) -> tuple[str, Path | None]:
        """What uploaded files make: one GGUF's blob, or a Hugging Face folder with the files linked under their
        names (a staging folder the caller removes)."""
        missing = [f for f, d in files.items() if not blobs.path_of(d).is_file()]
        if missing:
            raise BadRequest(f"{', '.join(missing)}: not uploaded", "Upload each file first: POST /api/blobs/sha256:DIGEST.")
        if len(files) == 1 and next(iter(files)).lower().endswith(".gguf"):
            return str(blobs.path_of(next(iter(files.values())))), None
        staging = blobs.blobs_dir() / f".create-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            for fname, d in files.items():
                if "/" in fname or fname.startswith("."):
                    raise BadRequest(f"file name {fname!r} is not a plain file name", "Name files without folders.")
                (staging / fname).hardlink_to(blobs.path_of(d))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return str(staging), staging

    def from_model(self, base: str) -> str:
        """FROM as a client gives it: an older client's uploaded file (@DIGEST) or a model of this server."""
        if base.startswith("@"):
            return str(blobs.path_of(base[1:]))
        name = ol.model_name(base)
        if not self.registry.store.exists(name):
            raise ModelNotFound(f"model {base!r} not found", "FROM names a model of this server, or a file uploaded as a blob.")
        return name

    async def create(self, body: ol.CreateRequest) -> Any:
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
                    spec["from"], staging = self.from_files(body.files)
                elif spec.get("from"):
                    spec["from"] = self.from_model(str(spec["from"]))
                report({"status": "creating model"})
                create(name, spec, store=self.registry.store)
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
            self.registry.add(name)
            report({"status": "success"})

        return await self.progress(work, body.stream)

    async def copy(self, body: ol.CopyRequest) -> Any:
        try:
            self.check_allowed()
            src, dst = ol.model_name(body.source), ol.model_name(body.destination)
            await asyncio.to_thread(derive_copy, src, dst, store=self.registry.store)
            self.registry.add(dst)
        except Exception as exc:
            return self.error(exc)
        return Response(status_code=200)

    async def delete(self, request: Request) -> Any:
        r = self.registry
        try:
            self.check_allowed()
            raw = json.loads(await request.body() or b"{}")
            name = ol.model_name(str(raw.get("model") or raw.get("name") or ""))
            r.store.require(name)
            if name in r.names:
                await asyncio.to_thread(r.drop, name)
            elif (why := r.in_use(name)) is not None:
                raise BadRequest(f"{name} is {why} on this server", "Stop the server to remove it (slmkit models rm).")
            await asyncio.to_thread(r.store.remove, name)
        except Exception as exc:
            return self.error(exc)
        return Response(status_code=200)

    async def has_blob(self, digest: str) -> Any:
        try:
            self.check_allowed()
            return Response(status_code=200 if blobs.path_of(digest).is_file() else 404)
        except Exception as exc:
            return self.error(exc)

    async def put_blob(self, digest: str, request: Request) -> Any:
        try:
            self.check_allowed()
            writer = blobs.BlobWriter(digest)
        except Exception as exc:
            return self.error(exc)
        try:
            async for chunk in request.stream():
                await asyncio.to_thread(writer.feed, chunk)
            await asyncio.to_thread(writer.finish)
        except Exception as exc:
            writer.abort()
            return self.error(exc)
        return Response(status_code=201)


def manage_routes(server: Server, error: Callable[[BaseException], JSONResponse]) -> APIRouter:
    """Ollama's pull, create, copy, delete and blob uploads, one method of ManageApi each."""
    api = ManageApi(server, error)
    router = APIRouter(dependencies=[Depends(identify)])
    router.post("/api/pull")(api.pull)
    router.post("/api/create")(api.create)
    router.post("/api/copy")(api.copy)
    router.delete("/api/delete")(api.delete)
    router.head("/api/blobs/{digest}")(api.has_blob)
    router.post("/api/blobs/{digest}")(api.put_blob)
    return router
