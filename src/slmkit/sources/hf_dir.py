"""Read Hugging Face model folders (config.json, *.safetensors, tokenizer files); never unpickle, never remote code."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmkit import faults
from slmkit.card import GUARD_KEY, read_config
from slmkit.errors import ImportFailed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header
FALLBACK_CONTEXT = 2048  # a model's context when its config names none (max_position_embeddings)


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (header unreadable, data shorter or longer than the header says), or None.
    Reads only the header: 8 bytes of length, then the JSON with every tensor's data offsets."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER, size - 8):
                return f"its header claims {n:,} bytes but the file has {size:,}"
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        return f"its header is not readable ({type(exc).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"it has {size:,} bytes where its header says {expected:,} ({'truncated' if size < expected else 'extra bytes'})"
    return None


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




def guard_config(folder: Path, kind: str, why: str) -> None:
    """Rewrite folder/config.json (a staging folder) so loaders other than slmkit refuse it; read_config and
    model_config still see the true architecture."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data[GUARD_KEY] = {"kind": kind, "model_type": data["model_type"], "architectures": data.get("architectures"), "why": why}
    data["model_type"] = f"slmkit-{kind}"
    data["architectures"] = [f"Slmkit{kind.title().replace('-', '')}Model"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved beside a model (the model's config given, so a guarded layout reads quietly)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), config=model_config(folder), trust_remote_code=False)


def model_config(folder: Path) -> Any:
    """The transformers config of a store folder, whatever slmkit layout it is saved in (no remote code)."""
    from transformers import AutoConfig

    data = read_config(folder)
    data.pop(GUARD_KEY, None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


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

    from transformers import AutoModelForCausalLM

    from slmkit import progress

    faults.point("loading")
    for weights in sorted(Path(folder).glob("*.safetensors")):  # a damaged file is named before transformers reads it
        if why := safetensors_problem(weights):
            raise ImportFailed(f"{weights} is damaged: {why}",
                               "A store model: remove it (slmkit models rm NAME) and make it again; a folder: save it again.")
    try:
        with progress.step(what) if what else nullcontext():
            tokenizer = load_tokenizer(folder)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ImportFailed(
            f"transformers could not load {folder}: {exc}",
            "Check that the folder is a complete causal language model (matching config.json and weights); "
            "a damaged store model can be removed (slmkit models rm NAME) and imported again.",
        ) from exc
    return model, tokenizer
