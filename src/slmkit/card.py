"""The model card: what a model is and where it came from (lineage), as JSON for tools and Markdown for people."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import safe_open

from slmkit.errors import BrokenModel, ImportFailed
from slmkit.version import __version__

CARD_JSON = "card.json"
CARD_MD = "card.md"
CARD_FORMAT = 1
# A model slmkit saves in a layout of its own (layers no standard format holds: low-rank factors, AWQ's per-channel
# smoothing) must not load as garbage elsewhere: its config.json names a model type no other library knows, so
# transformers, vLLM or lm-eval stop with "does not recognize this architecture"; the true one is kept under this key.
GUARD_KEY = "slmkit_layout"


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
    layout = data.get(GUARD_KEY)
    if isinstance(layout, dict):  # slmkit's own layout: its true architecture, as slmkit reads it
        data["model_type"], data["architectures"] = layout["model_type"], layout["architectures"]
    return data


@dataclass
class ModelCard:
    """Lineage and facts of one stored model; every stage writes one for the model it makes."""

    name: str
    architecture: str
    model_type: str
    parameters: int
    size_bytes: int
    dtype: str
    context_length: int
    stage: str
    source: dict[str, Any]
    parent: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    weights_bytes: dict[str, int] = field(default_factory=dict)  # per weight format: safetensors, gguf
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    slmkit_version: str = ""
    format: int = CARD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def front_matter(self) -> dict[str, Any]:
        """The Hugging Face model-card YAML header this card can fill: base model, license where its settings know it,
        the data files that shaped it, tags (slmkit, the stage, the scheme)."""
        general = self.settings.get("general") or {}
        data = self.settings.get("data") if isinstance(self.settings.get("data"), dict) else {}
        calib = self.settings.get("calibration") if isinstance(self.settings.get("calibration"), dict) else {}
        datasets = [Path(str(f)).name for f in (data.get("files") or [])] + ([Path(str(calib["file"])).name] if calib.get("file") else [])
        tags = ["slmkit", self.stage] + [str(self.settings[k]) for k in ("scheme", "method") if isinstance(self.settings.get(k), str)]
        header = {"base_model": self.parent or general.get("basename"), "license": general.get("license"),
                  "library_name": "gguf" if "safetensors" not in self.weights_bytes and "gguf" in self.weights_bytes else "transformers",
                  "pipeline_tag": "text-generation", "datasets": sorted(set(datasets)) or None, "tags": list(dict.fromkeys(tags))}
        return {k: v for k, v in header.items() if v}

    def to_markdown(self) -> str:
        import yaml

        src = ", ".join(f"{k}: `{v}`" for k, v in self.source.items())
        lines = [
            "---",
            yaml.safe_dump(self.front_matter(), sort_keys=False).rstrip(),
            "---",
            "",
            f"# {self.name}",
            "",
            "| | |",
            "|---|---|",
            f"| architecture | {self.architecture} ({self.model_type}) |",
            f"| parameters | {human_count(self.parameters)} ({self.parameters:,}) |",
            f"| size on disk | {human_bytes(self.size_bytes)} |",
            *(f"| {fmt} weights | {human_bytes(n)} |" for fmt, n in sorted(self.weights_bytes.items())),
            f"| weights dtype | {self.dtype} |",
            f"| context length | {self.context_length} |",
            f"| made by stage | {self.stage} |",
            f"| parent | {self.parent or '-'} |",
            f"| source | {src} |",
            f"| created | {self.created} |",
            f"| slmkit | {self.slmkit_version} |",
            "",
        ]
        if self.settings:
            lines += ["## Settings", "", "```json", json.dumps(self.settings, indent=2), "```", ""]
        if self.metrics:
            lines += ["## Metrics", "", "```json", json.dumps(self.metrics, indent=2), "```", ""]
        lines += ["## Files (sha256)", ""] + [f"- `{n}` {h}" for n, h in sorted(self.files.items())] + [""]
        return "\n".join(lines)


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8", "I32": "int32"}


def count_parameters(folder: Path) -> tuple[int, str]:
    """Count stored parameters (tied weights are stored once) and name the dominant dtype, without loading.

    Reads safetensors headers; a GGUF-only folder is counted from the GGUF tensor table.
    """
    total = 0
    by_dtype: dict[str, int] = {}
    if not list(folder.glob("*.safetensors")):
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            import gguf

            reader = gguf.GGUFReader(str(ggufs[0]))
            for t in reader.tensors:
                by_dtype[t.tensor_type.name] = by_dtype.get(t.tensor_type.name, 0) + int(t.n_elements)
            total = sum(by_dtype.values())
            return total, max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "unknown"
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
                dt = _DTYPE_NAMES.get(str(sl.get_dtype()), str(sl.get_dtype()).lower())
                by_dtype[dt] = by_dtype.get(dt, 0) + n
    dominant = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "unknown"
    return total, dominant


def build_card(
    folder: Path,
    *,
    name: str,
    stage: str,
    source: dict[str, Any],
    parent: str | None = None,
    settings: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    parameters: int | None = None,
) -> ModelCard:
    """Describe the model files in `folder` (hashes, sizes, parameters) and its lineage."""
    config = read_config(folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (CARD_JSON, CARD_MD)}
    size = sum((folder / n).stat().st_size for n in files)
    params, dtype = count_parameters(folder)
    params = parameters or params  # packed or quantized tensors undercount: a stage passes the logical count
    weights: dict[str, int] = {}
    for fmt in ("safetensors", "gguf"):
        total = sum(p.stat().st_size for p in folder.glob(f"*.{fmt}"))
        if total:
            weights[fmt] = total
    return ModelCard(
        name=name,
        architecture=(config.get("architectures") or ["unknown"])[0],
        model_type=config.get("model_type", "unknown"),
        parameters=params,
        size_bytes=size,
        dtype=dtype,
        context_length=int(config.get("max_position_embeddings") or 0),
        stage=stage,
        source=source,
        parent=parent,
        settings=settings or {},
        files=files,
        weights_bytes=weights,
        metrics=metrics or {},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        slmkit_version=__version__,
    )


def write_card(folder: Path, card: ModelCard) -> None:
    """card.json and card.md, each written to a temporary name and renamed into place (a reader never sees half)."""
    for name, text in ((CARD_JSON, card.to_json()), (CARD_MD, card.to_markdown())):
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, folder / name)


def read_card(folder: Path) -> ModelCard:
    """The card of a store folder, or BrokenModel saying why it cannot be read (never a parser's traceback)."""
    try:
        return ModelCard.from_json((folder / CARD_JSON).read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        why = {"JSONDecodeError": "not valid JSON", "TypeError": "fields missing or of the wrong type",
               "AttributeError": "not a JSON object"}.get(type(exc).__name__, f"{type(exc).__name__}: {str(exc)[:120]}")
        raise BrokenModel(f"the card of {folder.name} ({folder / CARD_JSON}) cannot be read: {why}",
                          f"Remove the model (`slmkit models rm {folder.name}`) and make it again, or restore its card.json.") from None
