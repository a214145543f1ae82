"""Read Hugging Face model folders (config.json, *.safetensors, tokenizer files); never unpickle, never remote code."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmkit.errors import ImportFailed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_hf_dir(path: Path) -> dict[str, Any]:
    """Validate the folder's contents and return its config; clear errors for what is missing."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ImportFailed(
            f"{path} has no config.json, so it is not a Hugging Face model folder",
            "Give a folder with config.json, *.safetensors and tokenizer files, or a .gguf file.",
        )
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        why = f" (found only pickle files: {', '.join(pickled)}; slmkit never unpickles)" if pickled else ""
        raise ImportFailed(
            f"{path} has no *.safetensors weights{why}",
            "Save the model with safetensors (model.save_pretrained(dir, safe_serialization=True)) and import again.",
        )
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):  # a damaged file fails here, before anything is loaded
        try:
            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise ImportFailed(f"{weights} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:120]})",
                               "Save the weights again (model.save_pretrained(dir, safe_serialization=True)).") from exc
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ImportFailed(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
            "Save the tokenizer beside the weights (tokenizer.save_pretrained(dir)) and import again.",
        )
    return read_config(path)


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict: the one place slmkit parses it."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ImportFailed(f"cannot read {path}: {exc}", "Give a model folder with its config.json.") from exc
    except json.JSONDecodeError as exc:
        raise ImportFailed(f"{path} is not valid JSON: {exc}", "Fix or regenerate config.json.") from exc
    if not isinstance(data, dict):
        raise ImportFailed(f"{path} is not a JSON object", "Fix or regenerate config.json.")
    return data


def float_writer(model: Any, tokenizer: Any, name: str) -> Callable[[Path], None]:
    """What a stage hands Store.derive to write a float model: safetensors weights, config and tokenizer."""
    from slmkit import progress

    def write(staging: Path) -> None:
        with progress.step(f"Writing {name}"):
            model.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))

    return write


def load_float(folder: Path, *, dtype: Any = "auto", what: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder of float safetensors weights: for running (dtype "auto", the stored one) or
    for editing by a stage (dtype torch.float32); `what` shows as a progress step. Never pickle, never remote code."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmkit import progress

    try:
        with progress.step(what) if what else nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ImportFailed(
            f"transformers could not load {folder}: {exc}",
            "Check that the folder is a complete causal language model (matching config.json and weights); "
            "a damaged store model can be removed (slmkit models rm NAME) and imported again.",
        ) from exc
    return model, tokenizer
