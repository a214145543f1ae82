"""Weight-only quantization of a model: find its Linear layers, quantize them (rtn, gptq or awq), save, load.

Model walking lives here; the math is in quant_ops.py. Layers are found by type (nn.Linear), never by
hard-coded paths, so any causal LM that transformers builds is walked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.compress import quant_ops as qo
from slmkit.compress import smooth_ops as so
from slmkit.compress.calibrate import collect_stats
from slmkit.engine.families import FAMILIES, LLAMA
from slmkit.layers.int_packing import pack_nibbles
from slmkit.layers.integer import COMPUTE, INT8_ACTIVATIONS, INTEGER_LAYERS, SCHEME_BITS, HeadEmbedding, Int4Linear, layer_class
from slmkit.layers.walk import decoder_blocks, linear_layers, set_module
from slmkit.errors import SlmkitError
from slmkit.sources.forms import QUANT_KEY
from slmkit.sources.hf_dir import guard_config

SCHEMES = tuple(SCHEME_BITS)  # int8, int4 weight-only; w8a8, w4a8: int8 activations too, on the integer units
METHODS = ("rtn", "gptq", "awq", "smoothquant")  # smoothquant: w8a8/w4a8 only, then round to nearest
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 32  # int4 weights per scale and minimum
# the output head's scheme where it differs from the rest: w4a8 keeps it int8 (on the default model its weights sit on
# no 4-bit grid, and rounding them to one costs most of w4a8's perplexity: bench/results/w4a8.md)
DEFAULT_HEAD = {"w4a8": "w8a8"}
# where the token embedding comes from in a child whose embedding was tied to its output head: "head" (the integer
# head's rows, layers/integer.HeadEmbedding: no float table kept) or "separate" (a bf16 table, the standard layout)
EMBEDDINGS = ("head", "separate")
# a child in these schemes whose head is 8-bit reads its embedding from the head by default (int8 rows: near lossless;
# a 4-bit head's rows cost Gemma 3 270M +9.9% perplexity as its embedding against +3.5% with its own table)
HEAD_EMBEDDING_SCHEMES = ("w4a8",)
DEFAULT_METHOD = "rtn"  # round to nearest: no calibration data needed
AWQ_GRID = 11  # alphas 0, 0.1, ..., 1
_WEIGHT_ONLY = ("integer kernels with bf16 activations for <= 16 rows, dequantized float32 matmul above; other weights "
                "and activations bf16")
COMPUTE_NOTES = {
    "int8": _WEIGHT_ONLY,
    "int4": _WEIGHT_ONLY,
    "w8a8": "activations quantized to int8 per token at run time, int8 x int8 -> int32 on the integer units (slmkit's "
            "VNNI kernel, torch._int_mm or oneDNN's quantized linear, timed per shape on the machine); other weights and "
            "activations float32",
    "w4a8": "activations quantized to int8 per token at run time, 4-bit weights unpacked in registers and multiplied on "
            "the integer units (slmkit's VNNI kernel; a dequantized float32 matmul without it); other weights and "
            "activations float32",
}


def check_method(scheme: str, method: str) -> None:
    """The scheme and method exist and go together (before any model is loaded)."""
    if scheme not in SCHEMES:
        raise SlmkitError(f"unknown scheme {scheme!r}", f"Schemes: {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise SlmkitError(f"unknown method {method!r}", f"Methods: {', '.join(METHODS)}")
    if method == "smoothquant" and scheme not in INT8_ACTIVATIONS:
        raise SlmkitError(f"--method smoothquant balances int8 activations; {scheme} keeps activations in float",
                          f"Use --scheme {' or '.join(INT8_ACTIVATIONS)} with it, or --method rtn, gptq or awq.")


def head_scheme(scheme: str, head: str | None, portable: bool = False) -> str:
    """The output head's scheme: `head` where given (any with the same kind of activations as the model's: int8 or int4
    weights for weight-only schemes, w8a8 or w4a8 for the others), else the scheme's default; `portable`: the model's
    own (a head of its own has no form transformers loads)."""
    if portable and head not in (None, scheme):
        raise SlmkitError(f"--head {head} with --portable: a head in another scheme has no compressed-tensors form that "
                          "transformers loads", f"Drop --portable, or --head (a portable {scheme} child has a {scheme} head).")
    if head is None:
        return scheme if portable else DEFAULT_HEAD.get(scheme, scheme)
    same_kind = [s for s in SCHEMES if (s in INT8_ACTIVATIONS) == (scheme in INT8_ACTIVATIONS)]
    if head not in same_kind:
        raise SlmkitError(f"--head {head} does not go with --scheme {scheme}",
                          f"The output head takes the same kind of activations as the rest: --head {' or '.join(same_kind)}.")
    return head


def embedding_form(scheme: str, embedding: str | None, method: str, portable: bool = False, head: str | None = None) -> str:
    """"head" or "separate" (EMBEDDINGS): `embedding` where given, checked, else "head" where the layers are in
    HEAD_EMBEDDING_SCHEMES, the head (`head`: its scheme) is 8-bit and it can be."""
    if embedding is not None and embedding not in EMBEDDINGS:
        raise SlmkitError(f"unknown --embedding {embedding!r}", f"Use one of {', '.join(EMBEDDINGS)}.")
    smoothing = method in ("awq", "smoothquant")  # the head's weights scaled: its rows are no longer the embedding's
    if embedding == "head" and (portable or smoothing):
        raise SlmkitError(f"--embedding head with {'--portable' if portable else '--method ' + method}: "
                          + ("an embedding read from the head has no compressed-tensors form" if portable else
                             "the smoothed head's rows are not the embedding's"),
                          "Drop --embedding head (the child keeps its own embedding table).")
    if embedding is None:
        default = scheme in HEAD_EMBEDDING_SCHEMES and SCHEME_BITS[head_scheme(scheme, head, portable)] == 8
        return "head" if default and not (portable or smoothing) else "separate"
    return embedding


def check_settings(scheme: str, method: str, group_size: int | None, layers: dict[str, nn.Linear]) -> int | None:
    """The group size of the 4-bit `layers` (None where there are none: int8 is per output channel)."""
    check_method(scheme, method)
    if not layers:
        return None
    group = group_size or DEFAULT_GROUP
    if group not in GROUP_SIZES:
        raise SlmkitError(f"group size {group} is not supported", f"Use one of {GROUP_SIZES}.")
    bad = sorted({m.in_features for m in layers.values() if m.in_features % group})
    if bad:
        fits = [g for g in GROUP_SIZES if all(m.in_features % g == 0 for m in layers.values())]
        raise SlmkitError(f"group size {group} does not divide the input sizes {bad} of this model",
                          f"Use --group-size {' or '.join(map(str, fits)) or '(none fits)'}.")
    return group


# ---- one layer -----------------------------------------------------------------------------------------------
def _qdq(w: torch.Tensor, scheme: str, group: int | None) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize (for error measurements)."""
    if SCHEME_BITS[scheme] == 8:
        return qo.dequantize_int8(*qo.quantize_int8(w))
    return qo.dequantize_int4(*qo.quantize_int4(w, group))


def awq_scales(w: torch.Tensor, x: torch.Tensor, absmean: torch.Tensor, scheme: str, group: int | None) -> torch.Tensor:
    """AWQ's search: s = absmean^alpha (alpha on a grid) minimizing ||x W^T - (x/s) Q(W s)^T|| on sample rows."""
    ref = x @ w.T
    best, best_err = torch.ones_like(absmean), float("inf")
    for i in range(AWQ_GRID):
        alpha = i / (AWQ_GRID - 1)
        s = absmean.clamp(min=1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = float(((x / s) @ _qdq(w * s, scheme, group).T - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


def smooth_mappings(model_type: str | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """SmoothQuant, folded: inside each decoder block, (the module whose output some linears read, those linears),
    from the family's layout (engine/families.py; llm-compressor's default mappings on Llama's): x / s goes into that
    module's weight and the child computes no extra operation. The norm before attention feeds q/k/v (Phi-3: its one
    fused layer), v feeds o (v's row j scales channel j of every query head reading that KV head), the norm before
    the MLP feeds gate/up (Gemma: pre_feedforward_layernorm, not the norm on attention's output), up feeds down
    (act(gate) * up: up's row j scales channel j); a fused layer's half is not smoothed."""
    fam = FAMILIES.get(model_type or "", LLAMA)
    maps = [(fam.attn_norm, fam.qkv), (fam.mlp_norm, fam.gate_up)]
    if len(fam.qkv) == 3:
        maps.insert(1, (fam.qkv[2], ("self_attn.o_proj",)))
    if len(fam.gate_up) == 2:
        maps.append((fam.gate_up[1], ("mlp.down_proj",)))
    return tuple(maps)


def _divide_norm(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    """A norm whose output is scaled by (offset + weight) (Gemma: 1 + weight) now scales by that / s."""
    norm.weight.copy_((offset + norm.weight.float()) / s - offset)


def smooth_model(model: nn.Module, stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """In place, before quantizing: per mapping, the SmoothQuant scales of least W8A8 error on the calibration
    sample, multiplied into the linears' columns and divided out of the module before them. Returns the alpha
    chosen per smoothed module (a mapping where smoothing does not help is left alone)."""
    prefix, blocks = decoder_blocks(model)
    model_type = getattr(model.config, "model_type", None)
    offset = FAMILIES.get(model_type or "", LLAMA).norm_offset
    chosen: dict[str, float] = {}
    for i, block in enumerate(blocks):
        for before, readers in smooth_mappings(model_type):
            try:
                prev, lins = block.get_submodule(before), [block.get_submodule(r) for r in readers]
            except AttributeError:  # another layout: no smoothing there
                continue
            stat = stats[f"{prefix}.{i}.{readers[0]}"]  # the readers share their input
            w = torch.cat([lin.weight.detach().float() for lin in lins])  # (sum N, K)
            heads = None  # v -> o with grouped-query attention: fewer value channels than o's inputs
            if isinstance(prev, nn.Linear) and prev.out_features != w.shape[1]:
                config = model.config
                heads = (config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
                if prev.out_features * heads[0] != w.shape[1] * heads[1]:
                    continue
            s, alpha = so.search_scales(stat["sample"], w, stat["absmax"], heads)
            if s is None:
                continue
            with torch.no_grad():
                for lin in lins:
                    lin.weight.mul_(s)
                if isinstance(prev, nn.Linear):
                    s = s if heads is None else so.group_heads(s, *heads)  # one scale per value channel
                    prev.weight.div_(s[:, None])
                    if prev.bias is not None:
                        prev.bias.div_(s)
                else:  # a norm's per-channel weight
                    _divide_norm(prev, s, offset)
            chosen[f"{prefix}.{i}.{before}"] = alpha
    head, names = model.get_output_embeddings(), {m: n for n, m in model.named_modules()}
    final_norm = getattr(getattr(model, "model", None), "norm", None)  # the output head reads the final norm
    if head is not None and final_norm is not None and names.get(head) in stats:
        stat = stats[names[head]]
        s, alpha = so.search_scales(stat["sample"], head.weight.detach().float(), stat["absmax"])
        if s is not None:
            with torch.no_grad():
                head.weight = nn.Parameter(head.weight.detach() * s)  # a copy: the embeddings it may be tied to stay
                _divide_norm(final_norm, s, offset)
            chosen[names[final_norm]] = alpha
    return chosen


def _stored_grid(scale: torch.Tensor, lo: torch.Tensor, integer_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 grid with its scale (and a free minimum) rounded to the dtype they are stored in, an integer zero
    point kept whole: the weights are rounded on the grid that is saved, so every reader dequantizes what was chosen."""
    s = scale.to(COMPUTE).float()
    if not integer_zero:
        return s, lo.to(COMPUTE).float()
    return s, -torch.round(-lo / scale) * s


def choose_int4_grid(layers: dict[str, nn.Linear], group: int) -> str:
    """"integer" (the standard form other tools read) unless the free-minimum grid fits the weights far better:
    it does for a model dequantized from a Q4_1 GGUF (the default model), whose weights already sit on such a grid
    (measured there: 0 error against 6.6% relative squared error, and WikiText-2 perplexity +6% instead of +41%)."""
    err = {kind: sum(qo.int4_error(m.weight.detach().float(), group, integer_zero=kind == "integer") for m in layers.values())
           for kind in ("integer", "float")}
    return "float" if err["float"] < 0.5 * err["integer"] else "integer"


def quantize_layer(lin: nn.Linear, scheme: str, group: int | None, method: str, stat: dict[str, torch.Tensor] | None,
                   grid: str = "integer") -> nn.Module:
    """A quantized replacement for `lin` (`grid`: int4's zero point, "integer" or "float")."""
    w = lin.weight.detach().float()  # (N, K)
    smooth = None
    if method == "awq":
        smooth = awq_scales(w, stat["sample"], stat["absmean"], scheme, group)
        w = w * smooth
    if SCHEME_BITS[scheme] == 8:
        new = layer_class(scheme)(lin.in_features, lin.out_features, lin.bias is not None)
        scales = qo.int8_scales(w)
        if scheme == "int8":
            scales = scales.to(COMPUTE).float()  # rounded on the grid that is saved (w8a8 keeps float32 scales)
        if method == "gptq":
            w = qo.gptq(w, stat["H"], lambda col, _i: torch.round(col / scales).clamp(-128, 127) * scales)
        q, _ = qo.quantize_int8(w, scales)
        new.weight.copy_(q)
        new.scales.copy_(scales.to(new.scales.dtype))
    else:
        new = layer_class(scheme)(lin.in_features, lin.out_features, lin.bias is not None, group)
        integer = grid == "integer"
        if method == "gptq":
            params: dict[str, torch.Tensor] = {}
            n, k = w.shape
            scale_cols, lo_cols = torch.zeros(n, k // group), torch.zeros(n, k // group)

            def refresh(cols: torch.Tensor) -> None:
                params["scale"], params["lo"] = _stored_grid(*qo.int4_params(cols, group, integer_zero=integer), integer)

            def qd(col: torch.Tensor, i: int) -> torch.Tensor:
                s, lo = params["scale"][:, 0], params["lo"][:, 0]
                scale_cols[:, i // group], lo_cols[:, i // group] = s, lo
                return torch.round((col - lo) / s).clamp(0, qo.INT4_MAX) * s + lo

            w = qo.gptq(w, stat["H"], qd, group=group, refresh=refresh)
            q, scale, lo = qo.quantize_int4(w, group, (scale_cols, lo_cols))
        else:
            q, scale, lo = qo.quantize_int4(w, group, _stored_grid(*qo.int4_params(w, group, integer_zero=integer), integer))
        new.qweight.copy_(pack_nibbles(q))
        new.scales.copy_(scale.to(COMPUTE))
        new.mins.copy_(lo.to(COMPUTE))
    if lin.bias is not None:
        new.bias.copy_(lin.bias.detach().to(COMPUTE))
    if smooth is not None:
        new.smooth = smooth.to(COMPUTE)
    return new


def quantize_model(
    model: nn.Module, scheme: str, *, method: str = DEFAULT_METHOD, group_size: int | None = None,
    calibration: list[torch.Tensor] | None = None, portable: bool = False, head: str | None = None,
    embedding: str | None = None,
) -> dict[str, Any]:
    """Replace every nn.Linear by its quantized form, in place; the rest of the model stays float32 in memory
    (and is saved as bfloat16). `portable`: only forms that compressed-tensors holds (int4's integer zero points,
    never AWQ's smoothing), so that transformers and vLLM read the child. `head`: the output head's scheme where it
    is to differ (head_scheme). `embedding`: "head" reads the token embedding from the integer head where the two were
    tied (embedding_form)."""
    layers = linear_layers(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and model.get_input_embeddings() is not None
    form = embedding_form(scheme, embedding, method, portable, head)
    if embedding == "head" and not tied:
        raise SlmkitError("--embedding head: this model's embedding and output head are not tied (their rows differ)",
                          "Drop --embedding head.")
    out_head = model.get_output_embeddings()
    head_name = next((n for n, m in layers.items() if m is out_head), None)
    head = head_scheme(scheme, head, portable) if head_name else scheme
    schemes = {n: head if n == head_name else scheme for n in layers}
    group = check_settings(scheme, method, group_size, {n: m for n, m in layers.items() if SCHEME_BITS[schemes[n]] == 4})
    if portable and method == "awq":
        raise SlmkitError("AWQ's smoothing has no compressed-tensors form: its children are read by slmkit only",
                          "Use --method gptq or rtn for a portable child, or drop --portable.")
    stats = None
    smoothed = None
    if method in ("gptq", "awq", "smoothquant"):
        if not calibration:
            raise SlmkitError(f"{method} needs calibration text", "Pass --calib FILE (plain text).")
        stats = collect_stats(model, layers, calibration, hessian=method == "gptq")
        if method == "smoothquant":
            smoothed = smooth_model(model, stats)
            stats = None  # the layers are then rounded to nearest
    method_for_layers = "rtn" if method == "smoothquant" else method
    four = {n: lin for n, lin in layers.items() if SCHEME_BITS[schemes[n]] == 4}
    grid = ("integer" if portable else choose_int4_grid(four, group)) if four else None
    with torch.no_grad(), progress.bar(f"quantizing ({scheme}, {method})", total=len(layers)) as advance:
        for name, lin in layers.items():
            own = schemes[name]
            set_module(model, name, quantize_layer(lin, own, group if SCHEME_BITS[own] == 4 else None, method_for_layers,
                                                   stats[name] if stats else None, grid or "integer"))
            advance(1)
    model.config.tie_word_embeddings = False  # the output layer now has its own quantized weight
    from_head = form == "head" and tied and head_name is not None
    if from_head:
        model.set_input_embeddings(HeadEmbedding(model.get_submodule(head_name), model.get_input_embeddings(), torch.float32))
    info = {"scheme": scheme, "method": method, "group_size": group, "modules": sorted(layers),
            **({"embedding": {"from": head_name}} if from_head else {}),
            **({"head": {"module": head_name, "scheme": head}} if head != scheme else {}),
            "smooth": method == "awq", **({"zero_point": grid} if grid else {}),
            **({"smoothquant": {"modules": len(smoothed), "alphas": sorted(set(smoothed.values()))}} if smoothed is not None else {}),
            "compute": COMPUTE_NOTES[scheme]}
    setattr(model.config, QUANT_KEY, info)
    return info


# ---- files ---------------------------------------------------------------------------------------------------
# Saved in compressed-tensors' pack-quantized layout (ct_layout.py), so transformers and vLLM read the integer weights
# correctly; a child with AWQ's per-channel smoothing has no standard form and is saved guarded (hf_dir.guard_config).
def save_quantized(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    from slmkit.sources import ct_layout

    info = getattr(model.config, QUANT_KEY)
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    state: dict[str, torch.Tensor] = {}
    integer = {n: m for n, m in model.named_modules() if isinstance(m, INTEGER_LAYERS)}
    for name, m in integer.items():
        state |= {f"{name}.{k}": v for k, v in ct_layout.layer_tensors(m, ct_layout.stored_scheme(info, name)).items()}
        if m.smooth is not None:
            state[f"{name}.smooth"] = m.smooth
        if info.get("zero_point") == "float" and isinstance(m, Int4Linear):  # free minimums: kept exactly, beside the (unused) integer zero points
            state[f"{name}.mins"] = m.mins
    # float tensors that were not quantized (embeddings, norms) are stored as bf16: half the bytes
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in integer:
            state[k] = v.to(COMPUTE) if v.is_floating_point() and v.dtype == torch.float32 else v
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", "slmkit": "quantized"})
    ignore = sorted(set(linear_layers(model)) - set(integer))
    ct_layout.write_config_block(folder, ct_layout.quantization_config(info["scheme"], info["group_size"], ignore, info.get("head")))
    guard = own_layout(info)
    if guard:
        guard_config(folder, *guard)


def own_layout(info: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, why) when a quantization has no compressed-tensors form and is saved in slmkit's own layout (guarded:
    other loaders refuse it); None when the child is in the standard layout."""
    if info.get("smooth"):
        return "awq", "AWQ's per-input-channel smoothing (x / s before the integer weights) has no compressed-tensors form; slmkit loads it"
    if info.get("zero_point") == "float":
        return "int4-free-minimum", ("int4 groups with free (non-integer) minimums, as llama.cpp's Q4_1, have no "
                                     "compressed-tensors form; slmkit loads it")
    if info.get("embedding"):
        return "embedding-from-head", ("a token embedding read from the integer output head has no compressed-tensors "
                                       "form; slmkit loads it")
    if info.get("head"):
        return "mixed-head", (f"an output head in {info['head']['scheme']} beside {info['scheme']} layers (transformers 5.24 with "
                              "compressed-tensors 0.20 cannot load the two config groups); slmkit loads it")
    return None


def for_training(model: nn.Module) -> nn.Module:
    """In place: a loaded quantized model ready to train adapters over: integer layers kept, the float parameters
    (embeddings, norms) in float32, so activations and gradients are float32."""
    for p in model.parameters():
        p.data = p.data.float()
    return model
