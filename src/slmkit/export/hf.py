"""`slmkit export --format hf`: a plain Hugging Face folder to hand to someone else or push with
`huggingface-cli upload`: config, safetensors weights, tokenizer, generation config, and a README model card whose
YAML header carries base_model, license, tags, pipeline_tag and the lineage. Low-rank models are multiplied back and
adapters merged (GGUF export does the same); integer children go as they are stored (compressed-tensors' layout,
which transformers and vLLM read); those in a layout only slmkit reads (AWQ, int4 with free minimums) are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.layers.integer import INT8_ACTIVATIONS
from slmkit.sources.ct_layout import FORMATS
from slmkit.sources.forms import is_quantized, is_router, is_standard
from slmkit.errors import SlmkitError
from slmkit.export.metadata import gguf_metadata, lineage
from slmkit.store import Store



def hub_id(card: Any) -> str | None:
    """The Hub repository a model came from, where its import says enough: ORGANIZATION/FILE-STEM of its GGUF."""
    general = (card.settings or {}).get("general") or {}
    path = (card.source or {}).get("path")
    if not general.get("organization") or not path:
        return None
    stem = Path(str(path)).name.split(".")[0]
    return f"{general['organization']}/{stem}"


def readme(store: Store, model: str, meta: dict[str, Any]) -> str:
    chain = lineage(store, model)
    root = chain[-1]
    base = hub_id(root) or (chain[1].name if len(chain) > 1 else None)
    scheme = ((chain[0].settings or {}).get("scheme") if chain[0].stage == "quantize" else None)
    tags = meta["tags"] + (["compressed-tensors", scheme] if scheme else [])
    header = {"license": meta["license"], "library_name": "transformers", "pipeline_tag": "text-generation",
              "tags": tags, **({"base_model": base} if base else {}), **({"language": meta["languages"]} if meta.get("languages") else {})}
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in header.items()] + ["---", "", f"# {model}", ""]
    lines.append(f"Made with slmkit from {base or root.name}" + (f": {meta['description']}." if meta.get("description") else "."))
    lines += ["", "| stage | model | settings |", "|---|---|---|"]
    for c in reversed(chain):
        shown = {k: v for k, v in (c.settings or {}).items() if k in ("method", "scheme", "sparsity", "ratio", "loss", "steps", "tokens", "teacher", "lora")}
        lines.append(f"| {c.stage} | {c.name} | {json.dumps(shown) if shown else ''} |")
    if scheme:
        acts = "int8 activations per token, quantized at run time" if scheme in INT8_ACTIVATIONS else "weight-only, activations in float"
        lines += ["", f"The linear layers hold {scheme} weights in compressed-tensors' {FORMATS[scheme]} layout ({acts}): "
                  "transformers loads it with `pip install compressed-tensors`, vLLM serves it."]
    if not meta["license_known"]:
        lines += ["", "The license of the model this came from is not recorded; check it before you share this."]
    return "\n".join(lines) + "\n"


def export_hf(model: str, out_dir: Path, *, store: Store | None = None) -> dict[str, Any]:
    from slmkit.export.store_export import COPIED, _dense_source

    store = store or Store()
    folder = store.require(model)
    if is_router(folder) or not list(folder.glob("*.safetensors")) or (is_quantized(folder) and not is_standard(folder)):
        parent = store.card(model).parent
        raise SlmkitError(f"{model} has no weights in a form a Hugging Face folder holds (a router, a GGUF, or integer "
                          "weights in a layout only slmkit reads: AWQ smoothing, int4 with free minimums, or slmkit <= 0.5's)",
                          f"Export its float parent ({parent or 'PARENT'}) with --format hf, or quantize it again with "
                          "--portable (slmkit quantize ... --portable), or export it as GGUF.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SlmkitError(f"{out_dir} exists and is not empty", "Give another --out, or remove it first.")
    meta = gguf_metadata(store, model, "F32")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _dense_source(folder) as (source, note), progress.step(f"Writing {model} as a Hugging Face folder"):
            config = json.loads((source / "config.json").read_text())
            rope = config.get("rope_parameters") or {}
            if "rope_theta" in rope:  # transformers 4 reads rope_theta at the top level
                config.setdefault("rope_theta", rope["rope_theta"])
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in ("model.safetensors", *(n for n in COPIED if n != "config.json")):  # config written above
                src = source / name if (source / name).is_file() else folder / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
            (tmp / "README.md").write_text(readme(store, model, meta))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"model": model, "out": str(out_dir), "note": note, "license": meta["license"], "license_known": meta["license_known"]}
