"""Read GGUF files: check them cheaply first, then load weights (dequantized) and tokenizer through transformers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slmkit.errors import ImportFailed
from slmkit.gguf_tables import PRE_TOKENIZERS

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> dict[str, Any]:
    """Validate a GGUF file (magic, header, tensor extents within the file) and return a few metadata fields.

    Fails fast with a clear error on a non-GGUF or truncated file, before any slow loading starts.
    """
    import gguf

    hint = "Give a complete .gguf file (re-download or re-export it) or a Hugging Face model folder."
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ImportFailed(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')", hint)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises several types on a damaged header
        raise ImportFailed(f"{path} is truncated or damaged: its GGUF header and tensor table do not fit the file "
                           f"({path.stat().st_size:,} bytes; the reader stopped with {type(exc).__name__})", hint) from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ImportFailed(f"{path} is truncated: tensor {t.name!r} ends past the end of the file", hint)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return {
        "pre_tokenizer": field("tokenizer.ggml.pre"),
        "architecture": field("general.architecture"),
        "model_name": field("general.name"),
        "file_type": file_type_name,
        "tensors": len(reader.tensors),
        # what the file says about the model (license, organization, ...): carried into exports of its children
        "general": {k: v for k in GENERAL_KEYS if (v := field(f"general.{k}")) is not None},
    }


GENERAL_KEYS = ("name", "organization", "finetune", "basename", "size_label", "license", "languages", "tags", "author", "version")


@contextmanager
def _no_tqdm() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar (no switch turns it off); ours is already showing."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *a, **k: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def gguf_config(path: Path) -> Any:
    """transformers' config for a GGUF file, with what its GGUF mapping leaves out read from the file's own keys, so
    the model computes what llama.cpp computes from the same file: the head size (`attention.key_length`; Qwen3's
    mapping falls back to 128), and for Gemma 3 the attention scale (llama.cpp scales by the head size), the window,
    which layers slide (`attention.sliding_window_pattern`, else every sixth layer is global) and each layer type's
    rope base (`rope.freq_base`, `rope.freq_base_swa`)."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()

    def field(key: str) -> Any:
        f = reader.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else None

    head_dim = field("attention.key_length")
    if head_dim and hasattr(config, "head_dim"):
        config.head_dim = int(head_dim)
    if config.model_type == "gemma3_text":
        config.query_pre_attn_scalar = config.head_dim
        window, pattern = field("attention.sliding_window"), field("attention.sliding_window_pattern")
        n = config.num_hidden_layers
        if window:
            config.sliding_window = int(window)
            slides = list(pattern) if isinstance(pattern, list) else [i % (pattern or 6) < (pattern or 6) - 1 for i in range(n)]
            config.layer_types = ["sliding_attention" if s else "full_attention" for s in slides]
        else:
            config.layer_types = ["full_attention"] * n
        base, local = field("rope.freq_base"), field("rope.freq_base_swa")
        config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": float(base or 1_000_000.0)},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": float(local or 10_000.0)}}
        return config
    rope = gguf_rope(reader, field, int(config.max_position_embeddings))
    if rope is not None:
        config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {}), **rope}  # (+ partial_rotary_factor)
        if hasattr(config, "original_max_position_embeddings"):  # (Phi-3's config keeps its own copy)
            config.original_max_position_embeddings = rope["original_max_position_embeddings"]
    return config


def gguf_rope(reader: Any, field: Any, context: int) -> dict[str, Any] | None:
    """transformers' rope_parameters for what a GGUF's scaling keys and factor tensors say (export/gguf.rope_scaling
    writes them), or None where the rotation is the default one: linear and YaRN from their keys; longrope from its
    short and long factors; llama.cpp's rope_freqs (per-dimension divisors of the default frequencies, as Llama 3's
    files carry) as a longrope whose two factor sets are those divisors and never switch."""
    kind = field("rope.scaling.type")
    theta = float(field("rope.freq_base") or 10000.0)
    factors = {t.name: [float(x) for x in t.data] for t in reader.tensors
               if t.name in ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")}
    if kind in ("linear", "yarn") and field("rope.scaling.factor") and float(field("rope.scaling.factor")) != 1.0:
        rope = {"rope_type": kind, "rope_theta": theta, "factor": float(field("rope.scaling.factor"))}
        if kind == "yarn":
            rope["original_max_position_embeddings"] = int(field("rope.scaling.original_context_length") or context)
            for key in ("beta_fast", "beta_slow"):
                if field(f"rope.scaling.yarn_{key}") is not None:
                    rope[key] = float(field(f"rope.scaling.yarn_{key}"))
        return rope
    if "rope_factors_short.weight" in factors:
        return {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors["rope_factors_short.weight"],
                "long_factor": factors.get("rope_factors_long.weight", factors["rope_factors_short.weight"]),
                "original_max_position_embeddings": int(field("rope.scaling.original_context_length") or context),
                "attention_factor": float(field("rope.scaling.attn_factor") or 1.0)}
    if "rope_freqs.weight" in factors:
        f = factors["rope_freqs.weight"]
        return {"rope_type": "longrope", "rope_theta": theta, "short_factor": f, "long_factor": f,
                "original_max_position_embeddings": context, "attention_factor": 1.0}
    return None


def load_gguf(path: Path, pre_tokenizer: str | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a GGUF file; weights are dequantized to float32.

    transformers rebuilds the tokenizer with a plain GPT-2 pre-tokenizer whatever the GGUF says; when the
    GGUF names one we know (e.g. smollm: digits split one by one), it is put back so that the PyTorch and
    llama.cpp backends tokenize alike.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmkit import progress

    folder, fname = str(path.parent), path.name
    try:
        with progress.step("Reading tokenizer from GGUF"):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            if pre_tokenizer in PRE_TOKENIZERS and hasattr(tokenizer, "backend_tokenizer"):
                tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre_tokenizer]()
        with progress.step("Dequantizing GGUF weights to float32"), _no_tqdm():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, config=gguf_config(path))
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise ImportFailed(
            f"transformers could not load {path}: {exc}",
            "GGUF import supports the architectures transformers' GGUF loader reads (llama, mistral, qwen2, "
            "qwen3, gemma, gemma3, phi3, ...). Import the original Hugging Face folder instead.",
        ) from exc
    # The weights are now plain float32 tensors: drop the GGUF marker so the model saves as safetensors.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer
