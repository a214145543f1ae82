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
from slmkit.compress.calibrate import collect_stats
from slmkit.layers.integer import COMPUTE, Int4Linear, Int8Linear, dense_linear
from slmkit.layers.walk import empty_skeleton, linear_layers, set_module
from slmkit.errors import SlmkitError
from slmkit.sources.hf_dir import read_config

SCHEMES = ("int8", "int4")
METHODS = ("rtn", "gptq", "awq")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 32  # int4 weights per scale and minimum
CONFIG_KEY = "slmkit_quantization"
AWQ_GRID = 11  # alphas 0, 0.1, ..., 1


def check_settings(scheme: str, method: str, group_size: int | None, layers: dict[str, nn.Linear]) -> int | None:
    if scheme not in SCHEMES:
        raise SlmkitError(f"unknown scheme {scheme!r}", f"Schemes: {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise SlmkitError(f"unknown method {method!r}", f"Methods: {', '.join(METHODS)}")
    if scheme == "int8":
        return None  # per output channel; a group size does not apply
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
    if scheme == "int8":
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


def quantize_layer(lin: nn.Linear, scheme: str, group: int | None, method: str, stat: dict[str, torch.Tensor] | None) -> nn.Module:
    """A quantized replacement for `lin`."""
    w = lin.weight.detach().float()  # (N, K)
    smooth = None
    if method == "awq":
        smooth = awq_scales(w, stat["sample"], stat["absmean"], scheme, group)
        w = w * smooth
    if scheme == "int8":
        new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        scales = qo.int8_scales(w)
        if method == "gptq":
            w = qo.gptq(w, stat["H"], lambda col, _i: torch.round(col / scales).clamp(-128, 127) * scales)
        q, _ = qo.quantize_int8(w, scales)
        new.weight.copy_(q)
        new.scales.copy_(scales.to(COMPUTE))
    else:
        new = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, group)
        if method == "gptq":
            params: dict[str, torch.Tensor] = {}
            n, k = w.shape
            scale_cols, lo_cols = torch.zeros(n, k // group), torch.zeros(n, k // group)

            def refresh(cols: torch.Tensor) -> None:
                params["scale"], params["lo"] = qo.int4_params(cols, group)

            def qd(col: torch.Tensor, i: int) -> torch.Tensor:
                s, lo = params["scale"][:, 0], params["lo"][:, 0]
                scale_cols[:, i // group], lo_cols[:, i // group] = s, lo
                return torch.round((col - lo) / s).clamp(0, qo.INT4_MAX) * s + lo

            w = qo.gptq(w, stat["H"], qd, group=group, refresh=refresh)
            q, scale, lo = qo.quantize_int4(w, group, (scale_cols, lo_cols))
        else:
            q, scale, lo = qo.quantize_int4(w, group)
        new.qweight.copy_(qo.pack_nibbles(q))
        new.scales.copy_(scale.to(COMPUTE))
        new.mins.copy_(lo.to(COMPUTE))
    if lin.bias is not None:
        new.bias.copy_(lin.bias.detach().to(COMPUTE))
    if smooth is not None:
        new.smooth = smooth.to(COMPUTE)
    return new


def quantize_model(
    model: nn.Module, scheme: str, *, method: str = "rtn", group_size: int | None = None,
    calibration: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Replace every nn.Linear by its quantized form, in place; the rest of the model stays float32 in memory
    (and is saved as bfloat16)."""
    layers = linear_layers(model)
    group = check_settings(scheme, method, group_size, layers)
    stats = None
    if method in ("gptq", "awq"):
        if not calibration:
            raise SlmkitError(f"{method} needs calibration text", "Pass --calib FILE (plain text).")
        stats = collect_stats(model, layers, calibration, hessian=method == "gptq")
    with torch.no_grad(), progress.bar(f"quantizing ({scheme}, {method})", total=len(layers)) as advance:
        for name, lin in layers.items():
            set_module(model, name, quantize_layer(lin, scheme, group, method, stats[name] if stats else None))
            advance(1)
    model.config.tie_word_embeddings = False  # the output layer now has its own quantized weight
    info = {"scheme": scheme, "method": method, "group_size": group, "modules": sorted(layers),
            "smooth": method == "awq",
            "compute": "integer kernels with bf16 activations for <= 16 rows, dequantized float32 matmul above; "
                       "other weights and activations bf16"}
    setattr(model.config, CONFIG_KEY, info)
    return info


# ---- files ---------------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    # float tensors that were not quantized (embeddings, norms) are stored as bf16: half the bytes
    state = {k: (v.to(COMPUTE) if v.is_floating_point() and v.dtype == torch.float32 else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "slmkit": "quantized"})


def is_quantized(folder: Path) -> bool:
    return (folder / "config.json").is_file() and CONFIG_KEY in read_config(folder)


def load_quantized(folder: Path) -> nn.Module:
    """Rebuild the architecture from config.json, swap in quantized shells, load the saved integers."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    info = getattr(config, CONFIG_KEY)
    # the float skeleton is built without memory, then the saved tensors are assigned in place: no full-size
    # float copy ever exists
    model = empty_skeleton(config, torch.float32)
    for name in info["modules"]:
        lin = model.get_submodule(name)
        if info["scheme"] == "int8":
            shell = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        else:
            shell = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, info["group_size"])
        if info.get("smooth"):
            shell.smooth = torch.ones(lin.in_features, dtype=COMPUTE)
        set_module(model, name, shell)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SlmkitError(f"the quantized weights in {folder} do not match the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}", "Quantize the model again.")
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise SlmkitError(f"the quantized file in {folder} lacks {leftover[:3]}", "Quantize the model again.")
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.prepare()
    # float parameters (embeddings, norms) in bf16: half the memory, and activations then stay bf16 between the
    # integer kernels (no per-layer dtype conversions); buffers such as rotary frequencies stay float32
    for p in model.parameters():
        p.data = p.data.to(COMPUTE)
    return model.eval()


def to_float(model: nn.Module) -> nn.Module:
    """In place: every integer layer back to a float32 nn.Linear (its dequantized weights) and the rest in float32:
    what adapters trained over integer weights (QLoRA) are merged into, and what training starts from."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (Int8Linear, Int4Linear)):
            set_module(model, name, dense_linear(m))
    for p in model.parameters():
        p.data = p.data.float()
    return model


def for_training(model: nn.Module) -> nn.Module:
    """In place: a loaded quantized model ready to train adapters over: integer layers kept, the float parameters
    (embeddings, norms) in float32, so activations and gradients are float32."""
    for p in model.parameters():
        p.data = p.data.float()
    return model
