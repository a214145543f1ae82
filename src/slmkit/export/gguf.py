"""Write a store model as GGUF (F32/F16 with gguf-py, other types through llama.cpp's quantizer) + a Modelfile."""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from slmkit import faults, progress
from slmkit.engine import llamacpp_guard
from slmkit.errors import SlmkitError
from slmkit.sources.hf_dir import FALLBACK_CONTEXT
from slmkit.card import read_config
from slmkit.export.metadata import write_metadata
from slmkit.gguf_tables import ARCHITECTURES, GGUF_TYPES, OLLAMA_TEMPLATES, pre_name_of


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs.  # (out, in)"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(config: dict[str, Any]) -> str:
    """The model's architecture, when llama.cpp would run the exported file as transformers runs the folder; else
    a clear refusal (asked before anything is loaded or written)."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise SlmkitError(
            f"GGUF export does not support the architecture {arch!r}",
            f"Supported: {', '.join(ARCHITECTURES)}.",
        )
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # (older configs: rope_scaling)
    ropes = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    ropes = [{**r, "rope_type": r.get("rope_type", r.get("type", "default"))} for r in ropes]
    kinds = {r["rope_type"] for r in ropes}
    why = None
    if len(ropes) > 1 and kinds != {"default"}:
        why = f"its rotary embeddings per layer type are scaled ({', '.join(sorted(kinds))}), which llama.cpp reads for one only"
    elif len(ropes) == 1 and (why_rope := rope_unwritable(ropes[0], ARCHITECTURES[arch].arch)):
        why = why_rope
    elif arch == "Gemma3ForCausalLM" and int(config.get("query_pre_attn_scalar") or head_dim) != head_dim:
        why = (f"llama.cpp scales Gemma 3's attention by its head size ({head_dim}), this model by "
               f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')}")
    elif arch == "Gemma3ForCausalLM" and config.get("use_bidirectional_attention"):
        why = "its attention is bidirectional (an embedding model)"
    if why:
        raise SlmkitError(f"GGUF export cannot write this {arch}: {why}", "Export it as a Hugging Face folder (--format hf).")
    return arch


# rope type -> the llama.cpp architectures that read what it needs (None: any); "llama3" is a table of per-dimension
# frequency divisors (rope_freqs), "longrope" two of them (short and long context) that only Phi-3's graph reads
ROPE_WRITABLE: dict[str, tuple[str, ...] | None] = {"default": None, "linear": None, "yarn": None, "llama3": ("LLAMA",),
                                                   "longrope": ("PHI3",)}


def rope_unwritable(rope: dict[str, Any], arch: str) -> str | None:
    """Why llama.cpp would rotate this model's (one) rope differently from transformers, or None."""
    kind = rope.get("rope_type", "default")
    if kind == "longrope" and arch == "LLAMA" and _fixed_factors(rope):
        return None  # one set of per-dimension divisors: Llama's rope_freqs (how a Llama 3 GGUF imports)
    if kind not in ROPE_WRITABLE:
        return f"its rotary embedding ({kind}) has no llama.cpp equivalent this writer knows"
    if ROPE_WRITABLE[kind] is not None and arch not in ROPE_WRITABLE[kind]:
        return f"llama.cpp reads {kind} rope factors for {', '.join(ROPE_WRITABLE[kind])} models only, not {arch}"
    if kind == "yarn" and any(rope.get(k) is not None for k in ("attention_factor", "mscale", "mscale_all_dim")):
        return "its YaRN rope sets its own attention factor; llama.cpp derives it from the scaling factor"
    if kind == "yarn" and rope.get("truncate") is False:
        return "its YaRN rope does not truncate the correction range, which llama.cpp always does"
    return None


def _fixed_factors(rope: dict[str, Any]) -> bool:
    """A longrope that never switches and does not scale attention: plain per-dimension frequency divisors."""
    return rope.get("short_factor") == rope.get("long_factor") and float(rope.get("attention_factor") or 0.0) == 1.0


def rope_scaling(folder: Path, arch: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The GGUF keys (writer method name -> value) and tensors that make llama.cpp rotate as transformers does for
    the folder's model (check_exportable has passed): linear and YaRN as scaling keys; llama3 as rope_freqs, the
    per-dimension divisor of the default frequencies (transformers' own llama3 frequencies, divided out); longrope
    as its short and long divisors, the context they switch at and its attention factor. llama.cpp picks longrope's
    long factors by the context a run is given (> the original context), transformers by the positions a call sees."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(str(folder))
    rope = getattr(cfg, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind == "default" or "full_attention" in rope:
        return {}, {}
    if kind == "linear":
        return {"add_rope_scaling_type": "LINEAR", "add_rope_scaling_factor": float(rope["factor"])}, {}
    if kind == "yarn":  # (a factor left out is transformers' max / original context)
        factor = rope.get("factor") or cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        keys = {"add_rope_scaling_type": "YARN", "add_rope_scaling_factor": float(factor),
                "add_rope_scaling_orig_ctx_len": int(rope["original_max_position_embeddings"])}
        for key in ("beta_fast", "beta_slow"):
            if rope.get(key) is not None:
                keys[f"add_rope_scaling_yarn_{key}"] = float(rope[key])
        return keys, {}
    if kind == "longrope" and arch == "LLAMA":  # (rope_unwritable let only fixed factors through)
        return {}, {"ROPE_FREQS": np.asarray(rope["short_factor"], dtype=np.float32)}
    inv_freq, attention = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"))  # llama3's frequencies, longrope's factor
    if kind == "llama3":
        dims = inv_freq.shape[0]
        default = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, 2 * dims, 2, dtype=torch.float32) / (2 * dims)))
        return {}, {"ROPE_FREQS": (default / inv_freq.float()).numpy().astype(np.float32)}
    return ({"add_rope_scaling_type": "LONGROPE", "add_rope_scaling_orig_ctx_len": int(rope["original_max_position_embeddings"]),
             "add_rope_scaling_attn_factors": float(attention)},
            {"ROPE_FACTORS_SHORT": np.asarray(rope["short_factor"], dtype=np.float32),
             "ROPE_FACTORS_LONG": np.asarray(rope["long_factor"], dtype=np.float32)})


def tensor_names(config: dict[str, Any]) -> Any:
    """gguf-py's map from Hugging Face tensor names to GGUF ones, for this model's architecture and depth."""
    import gguf

    spec = ARCHITECTURES[check_exportable(config)]
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.arch), config["num_hidden_layers"])


def copy_tokenizer(w: Any, source: Path, keep: list[int] | None = None) -> str | None:
    """Every tokenizer.* field of the GGUF `source` (the file a model was imported from: its SentencePiece or BPE
    vocabulary, scores, token types, special ids and chat template exactly as llama.cpp wrote them) into writer `w`;
    with `keep` (ids of that vocabulary, new id = position: a trimmed vocabulary), only those tokens, their merges,
    and the special ids renumbered. Returns the chat template."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = {key: (field.contents(), field.types) for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    new_id = {old: new for new, old in enumerate(keep)} if keep is not None else None
    kept_tokens = None
    if new_id is not None:
        tokens = fields["tokenizer.ggml.tokens"][0]
        kept_tokens = {tokens[i] for i in keep}
    template = None
    for key, (value, types) in fields.items():
        kind = types[0]
        sub = types[1] if kind == gguf.GGUFValueType.ARRAY and len(types) > 1 else None
        if new_id is not None:
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                value = [value[i] for i in keep]
            elif key == "tokenizer.ggml.merges":
                value = [m for m in value if (parts := m.split(" ", 1)) and len(parts) == 2
                         and parts[0] in kept_tokens and parts[1] in kept_tokens and parts[0] + parts[1] in kept_tokens]
            elif key.endswith("_token_id"):
                if value not in new_id:
                    continue  # a special token the trim dropped
                value = new_id[value]
        w.add_key_value(key, value, kind, sub_type=sub)
        if key == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            template = value
    return template


def check_type(gguf_type: str) -> str:
    t = gguf_type.upper()
    if t not in GGUF_TYPES:
        raise SlmkitError(f"unknown GGUF type {gguf_type!r}", f"Types: {', '.join(GGUF_TYPES)}")
    return t


def _tokenizer_fields(folder: Path) -> dict[str, Any]:
    tj = json.loads((folder / "tokenizer.json").read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise SlmkitError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}",
                          "Export a model with a GPT-2 style (byte-level BPE) tokenizer.")
    pre = pre_name_of(tj)
    if pre is None:
        raise SlmkitError("GGUF export does not recognise this tokenizer's pre-tokenizer",
                          f"Supported pre-tokenizers: see slmkit.gguf_tables.PRE_TOKENIZERS; found {json.dumps(tj.get('pre_tokenizer'))[:200]}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = (3 if t.get("special") else 4) if t else 1  # CONTROL / USER_DEFINED / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tcfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()

    def special_id(key: str) -> int | None:
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return vocab.get(tok) if tok else None

    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "template": template,
            "bos": special_id("bos_token"), "eos": special_id("eos_token"), "unk": special_id("unk_token"),
            "pad": special_id("pad_token"), "add_bos": bool(tcfg.get("add_bos_token", False))}


def write_gguf_f32(folder: Path, out: Path, *, name: str, f16: bool = False, meta: dict[str, Any] | None = None,
                   tokenizer_gguf: tuple[Path, list[int] | None] | None = None) -> str | None:
    """Convert a safetensors folder of a supported architecture (gguf_tables.ARCHITECTURES) to one GGUF file (2-D
    weights F16 when f16); its tokenizer from the folder's tokenizer.json (byte-level BPE), or else copied from
    `tokenizer_gguf`, the GGUF the model's tokenizer came from with the ids it kept (store_export.tokenizer_source;
    Gemma's SentencePiece vocabulary, trimmed or not).

    Returns the chat template written into the file (the Modelfile is made from it)."""
    import gguf
    from safetensors import safe_open

    config = read_config(folder)
    spec = ARCHITECTURES[check_exportable(config)]
    permute = spec.permute
    arch = getattr(gguf.MODEL_ARCH, spec.arch)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    n_layers = config["num_hidden_layers"]
    try:
        tok = _tokenizer_fields(folder)
    except SlmkitError:  # not a byte-level BPE this writer converts: the GGUF it came from has it as llama.cpp wants
        if tokenizer_gguf is None:
            raise
        tok = None

    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    if meta:
        write_metadata(w, meta)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32))
    w.add_context_length(config.get("max_position_embeddings", FALLBACK_CONTEXT))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    layer_types = list(config.get("layer_types") or [])
    if "full_attention" in rope:  # Gemma 3: a rope base per layer type (global layers, sliding-window layers)
        w.add_rope_freq_base(float(rope["full_attention"]["rope_theta"]))
        if "sliding_attention" in rope:
            w.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    else:
        w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    scaling_keys, scaling_tensors = rope_scaling(folder, spec.arch)
    for method, value in scaling_keys.items():
        getattr(w, method)(getattr(gguf.RopeScalingType, value) if method == "add_rope_scaling_type" else value)
    if "sliding_attention" in layer_types and config.get("sliding_window"):
        w.add_sliding_window(int(config["sliding_window"]))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    if tok is None:
        template = copy_tokenizer(w, *tokenizer_gguf)
        w.add_vocab_size(int(config["vocab_size"]))
    else:
        template = tok["template"]
        w.add_vocab_size(len(tok["tokens"]))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
            if tok[key] is not None:
                adder(tok[key])
        w.add_add_bos_token(tok["add_bos"])
        if template:
            w.add_chat_template(template)

    for kind, data in scaling_tensors.items():
        w.add_tensor(gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)] + ".weight", data)
    names = tensor_names(config)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                data = f.get_tensor(key).astype(np.float32)
                if permute and key.endswith("q_proj.weight"):
                    data = permute_rotary(data, n_head)
                elif permute and key.endswith("k_proj.weight"):
                    data = permute_rotary(data, n_kv)
                elif spec.norm_shift and key.endswith("norm.weight"):
                    data = data + np.float32(spec.norm_shift)
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise SlmkitError(f"no GGUF name for tensor {key!r}", f"This model has tensors llama.cpp's {spec.arch} layout lacks.")
                if f16 and data.ndim == 2:
                    data = data.astype(np.float16)
                w.add_tensor(target, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return template


@contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send what native code writes to standard error (llama.cpp's log) to a file while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
# "ncols 576 not divisible by 256 (required for type q4_K) -> falling back to q5_0" (older llama.cpp words it otherwise)
_FALLBACK_TYPE = re.compile(r"(?:ncols|tensor cols)\s+(\d+)(?: x \d+)? (?:are )?not divisible by (\d+).*?(?:falling back to|fallback quantization)\s+(\w+)")


def fallback_note(log: str, gguf_type: str) -> str | None:
    """One line for llama.cpp's fallback quantization (K-quants need rows that are a multiple of 256 wide)."""
    m = _FALLBACK.search(log)
    if not m:
        return None
    t = _FALLBACK_TYPE.search(log)
    why = f": rows of {t.group(1)} do not fit {t.group(2)}-wide blocks, so they were written as {t.group(3).upper()}" if t else ""
    return (f"{m.group(1)} of {m.group(2)} tensors fell back from {gguf_type}{why}; for this model Q4_0 or Q4_1 "
            "may be smaller at a similar quality (--type auto measures each)")


def quantize_gguf(
    src: Path, dst: Path, gguf_type: str, *, threads: int | None = None, imatrix: dict[str, np.ndarray] | None = None,
    log: Path | None = None,
) -> str | None:
    """llama.cpp's own quantizer, through llama-cpp-python's API; `imatrix` (GGUF name -> mean x^2 per input
    channel) weighs each column's rounding error, as `llama-quantize --imatrix` does. Its log goes to `log` (default:
    beside `dst`), shown on failure; returns a note on fallback quantization, if any."""
    import llama_cpp

    llamacpp_guard.require()  # its quantizer runs the same build's vector code
    log = log or dst.with_name(dst.name + ".log")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[gguf_type])
    params.nthread = threads or os.cpu_count() or 1
    keep: list[Any] = []  # the arrays must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the last one ends the list
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep += [arr, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = entries
    with native_stderr_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    text = log.read_text(errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise SlmkitError(f"llama.cpp's quantizer failed ({rc}) making {gguf_type}; its log ({log}) ends:\n{tail}", "Try another --type.")
    return fallback_note(text, gguf_type)


def default_system(template: str | None) -> str | None:
    """The system message a ChatML chat template adds by itself when a conversation has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM..."), found by rendering it for one user message; None if it adds none."""
    if not template or "<|im_start|>" not in template:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = ImmutableSandboxedEnvironment().from_string(template).render(
            messages=[{"role": "user", "content": "\ue000"}], add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:  # a template this sandbox cannot render: leave the system prompt to Ollama
        return None
    head = "<|im_start|>system\n"
    start = text.find(head)
    if start < 0 or start > text.find("\ue000"):
        return None
    return text[start + len(head): text.find("<|im_end|>", start)]


def modelfile_text(gguf_name: str, template: str | None, temperature: float, context: int | None = None) -> str:
    """An Ollama Modelfile: FROM the file beside it, the chat TEMPLATE in Go syntax (rendering what the GGUF's own
    template renders), the default SYSTEM prompt the template adds when a conversation has none, the stop tokens,
    the context length."""
    lines = [f"FROM ./{gguf_name}"]
    for markers, go_template, stops in OLLAMA_TEMPLATES.values():
        if template and all(m in template for m in markers):
            lines.append(f'TEMPLATE """{go_template}"""')
            system = default_system(template)
            if system:
                lines.append(f'SYSTEM """{system}"""')
            lines += [f'PARAMETER stop "{s}"' for s in stops]
            break
    lines.append(f"PARAMETER temperature {temperature}")
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


def export_gguf(
    folder: Path, out_dir: Path, *, name: str, gguf_type: str, threads: int | None = None,
    imatrix: dict[str, np.ndarray] | None = None, meta: dict[str, Any] | None = None, notes: list[str] | None = None,
    tokenizer_gguf: tuple[Path, list[int] | None] | None = None,
) -> Path:
    """Write `out_dir/NAME.gguf` and `out_dir/Modelfile`; each file appears only when complete."""
    from slmkit.engine.sampling import SamplingParams

    gguf_type = check_type(gguf_type)
    check_exportable(read_config(folder))
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{name}.gguf"
    tmp_f32 = out_dir / f".{name}.f32.tmp-{os.getpid()}"
    tmp_out = out_dir / f".{name}.gguf.tmp-{os.getpid()}"
    faults.point("loading")
    try:
        with progress.step(f"Writing GGUF ({'F16' if gguf_type == 'F16' else 'F32'})"):
            template = write_gguf_f32(
                folder, tmp_f32 if gguf_type not in ("F32", "F16") else tmp_out, name=name, f16=gguf_type == "F16", meta=meta,
                tokenizer_gguf=tokenizer_gguf)
        faults.point("writing")  # a temporary file is on disk: the next command sweeps it
        if gguf_type not in ("F32", "F16"):
            how = " and an importance matrix" if imatrix else ""
            with progress.step(f"Quantizing to {gguf_type} with llama.cpp{how}"):
                note = quantize_gguf(tmp_f32, tmp_out, gguf_type, threads=threads, imatrix=imatrix,
                                     log=out_dir / f"{name}.quantize.log")  # llama.cpp's log, kept beside the file
            if note and notes is not None:
                notes.append(note)
        os.replace(tmp_out, final)
    finally:
        for t in (tmp_f32, tmp_out):
            t.unlink(missing_ok=True)
    modelfile = out_dir / "Modelfile"
    tmp_mf = out_dir / f".Modelfile.tmp-{os.getpid()}"
    context = int(read_config(folder).get("max_position_embeddings") or 0) or None
    tmp_mf.write_text(modelfile_text(final.name, template, SamplingParams().temperature, context))
    os.replace(tmp_mf, modelfile)
    return final
