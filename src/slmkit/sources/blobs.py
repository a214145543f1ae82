"""Files uploaded for Ollama's create (`POST /api/blobs/sha256:HEX`): kept under SLMKIT_HOME/blobs by their digest,
each written to a temporary name and renamed into place only once its SHA-256 matches the digest it was sent as."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from slmkit.config import settings
from slmkit.errors import SlmkitError


def blobs_dir() -> Path:
    return settings().home / "blobs"


def hex_of(digest: str) -> str:
    """The hex of a `sha256:HEX` digest (Ollama's spelling; `sha256-HEX` too), or an error."""
    algo, hexa = digest[:6], digest[7:]
    if algo != "sha256" or digest[6:7] not in (":", "-") or len(hexa) != 64 or any(c not in "0123456789abcdef" for c in hexa):
        raise SlmkitError(f"{digest!r} is not a sha256 digest", "Name the blob sha256:<64 lower-case hex digits>.")
    return hexa


def path_of(digest: str) -> Path:
    return blobs_dir() / f"sha256-{hex_of(digest)}"


class BlobWriter:
    """Write one upload: feed() its chunks, then finish() checks the digest and installs it (or deletes it)."""

    def __init__(self, digest: str) -> None:
        self.target = path_of(digest)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.fh = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> Path:
        self.fh.close()
        got = self.hash.hexdigest()
        if "sha256-" + got != self.target.name:
            self.tmp.unlink(missing_ok=True)
            raise SlmkitError(f"the upload's SHA-256 is {got}, not the digest it was sent as ({self.target.name[7:]})",
                              "Send the file again with its own digest.")
        self.tmp.replace(self.target)
        return self.target

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)
