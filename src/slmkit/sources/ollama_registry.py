"""Ollama's registry (registry.ollama.ai, or any server speaking its protocol): a model's manifest, then its blobs.

The protocol is the OCI distribution one Ollama uses: `GET /v2/NAMESPACE/NAME/manifests/TAG` (a JSON manifest whose
layers are typed by mediaType: the GGUF weights, the chat template, the system prompt, the parameters, the license)
and `GET /v2/NAMESPACE/NAME/blobs/sha256:HEX` (often redirected to a CDN). Blobs download into a folder under
SLMKIT_HOME as `sha256-HEX.partial`, resume from where a killed pull stopped (an HTTP Range request), and become
`sha256-HEX` only once their SHA-256 matches the digest: a damaged or swapped blob never reaches the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit.errors import ImportFailed

DEFAULT_REGISTRY = "registry.ollama.ai"
MANIFEST_TYPES = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.ollama.image."  # + model, template, system, params, license, adapter, projector, messages
READ_AS_TEXT = ("template", "system", "license")
CHUNK = 1 << 20

Report = Callable[[dict[str, Any]], None]  # Ollama's pull progress lines: {"status", "digest", "total", "completed"}


@dataclass(frozen=True)
class OllamaRef:
    """`[SCHEME://][HOST/][NAMESPACE/]NAME[:TAG]` as Ollama spells it (host registry.ollama.ai, namespace library,
    tag latest by default)."""

    host: str
    namespace: str
    name: str
    tag: str
    scheme: str = "https"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}/v2/{self.namespace}/{self.name}"

    def __str__(self) -> str:
        host = "" if self.host == DEFAULT_REGISTRY else f"{self.host}/"
        ns = "" if self.namespace == "library" and not host else f"{self.namespace}/"
        return f"{host}{ns}{self.name}:{self.tag}"


def parse_ref(text: str) -> OllamaRef:
    scheme = "https"
    if "://" in text:
        scheme, text = text.split("://", 1)
        if scheme not in ("http", "https"):
            raise ImportFailed(f"{scheme}:// is not a registry address", "Use https:// (or http:// for a local registry).")
    parts = text.strip("/").split("/")
    host = DEFAULT_REGISTRY
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host = parts.pop(0)
        if host in ("ollama.com", "www.ollama.com"):
            host = DEFAULT_REGISTRY
    if len(parts) == 1:
        parts.insert(0, "library")
    if len(parts) != 2 or not all(parts):
        raise ImportFailed(f"{text!r} is not a model name Ollama's registry knows",
                           "Spell it NAME[:TAG], NAMESPACE/NAME[:TAG] or HOST/NAMESPACE/NAME:TAG (for example smollm2:135m).")
    namespace, rest = parts
    name, _, tag = rest.partition(":")
    return OllamaRef(host, namespace, name, tag or "latest", scheme)


def _client() -> Any:
    import httpx

    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=15.0))


def _failed(ref: OllamaRef, what: str, exc: Exception) -> ImportFailed:
    return ImportFailed(f"could not fetch {what} of {ref} from {ref.host}: {exc}",
                        "Check the name and tag (and the network); run the pull again: finished blobs are kept and an "
                        "unfinished one resumes.")


def fetch_manifest(ref: OllamaRef) -> dict[str, Any]:
    """The manifest of `ref`: {"layers": [{"mediaType", "digest", "size"}, ...], ...}."""
    import httpx

    try:
        with _client() as c:
            r = c.get(f"{ref.base}/manifests/{ref.tag}", headers={"Accept": MANIFEST_TYPES})
    except httpx.HTTPError as exc:
        raise _failed(ref, "the manifest", exc) from exc
    if r.status_code == 404:
        raise ImportFailed(f"{ref} was not found on {ref.host}", "Check the model's name and tag on the registry.")
    if r.status_code != 200:
        raise _failed(ref, "the manifest", RuntimeError(f"HTTP {r.status_code}"))
    try:
        manifest = r.json()
        layers = manifest["layers"]
        assert all(isinstance(x["digest"], str) and isinstance(x["size"], int) and x["mediaType"] for x in layers)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is one answer: not a manifest
        raise ImportFailed(f"{ref.host} answered for {ref} with something that is not a model manifest", "") from exc
    return manifest


def layer(manifest: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The manifest's layer of one kind (model, template, system, params, license, adapter, projector), if any."""
    found = [x for x in manifest["layers"] if x["mediaType"] == LAYER + kind]
    return found[0] if found else None


def _digest_hex(digest: str) -> str:
    algo, _, hexa = digest.partition(":")
    if algo != "sha256" or len(hexa) != 64 or any(c not in "0123456789abcdef" for c in hexa):
        raise ImportFailed(f"unsupported blob digest {digest!r}", "Only sha256 digests are read.")
    return hexa


def fetch_blob(ref: OllamaRef, entry: dict[str, Any], folder: Path, report: Report) -> Path:
    """Download one blob into `folder` (resuming a partial one), check its SHA-256, and return its path."""
    import httpx

    hexa, size, digest = _digest_hex(entry["digest"]), entry["size"], entry["digest"]
    done, partial = folder / f"sha256-{hexa}", folder / f"sha256-{hexa}.partial"
    folder.mkdir(parents=True, exist_ok=True)
    if done.is_file() and done.stat().st_size == size:
        report({"status": f"pulling {hexa[:12]}", "digest": digest, "total": size, "completed": size})
        return done
    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:
        partial.unlink()
        have = 0
    try:
        with _client() as c, c.stream("GET", f"{ref.base}/blobs/{digest}",
                                      headers={"Range": f"bytes={have}-"} if have else {}) as r:
            if r.status_code not in (200, 206):
                raise RuntimeError(f"HTTP {r.status_code}")
            if r.status_code == 200:  # the server ignored the range: start again
                have = 0
            with open(partial, "ab" if have else "wb") as fh:
                for chunk in r.iter_bytes():  # as it arrives: what came before a cut is kept for the resume
                    fh.write(chunk)
                    have += len(chunk)
                    report({"status": f"pulling {hexa[:12]}", "digest": digest, "total": size, "completed": min(have, size)})
    except (httpx.HTTPError, RuntimeError) as exc:
        raise _failed(ref, f"blob {hexa[:12]}", exc) from exc
    report({"status": "verifying sha256 digest"})
    h = hashlib.sha256()
    with open(partial, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    if h.hexdigest() != hexa or partial.stat().st_size != size:
        partial.unlink()
        raise ImportFailed(f"blob {hexa[:12]} of {ref} does not match its digest (got sha256 {h.hexdigest()[:12]}, "
                           f"{have:,} of {size:,} bytes); it was deleted", "Run the pull again.")
    partial.replace(done)
    return done


def read_layers(ref: OllamaRef, manifest: dict[str, Any], folder: Path, report: Report) -> dict[str, Any]:
    """The small layers (template, system prompt, license as text; parameters as JSON), downloaded and checked."""
    out: dict[str, Any] = {}
    for kind in (*READ_AS_TEXT, "params"):
        entry = layer(manifest, kind)
        if entry is not None:
            text = fetch_blob(ref, entry, folder, report).read_text(encoding="utf-8")
            out[kind] = json.loads(text) if kind == "params" else text
    return out
