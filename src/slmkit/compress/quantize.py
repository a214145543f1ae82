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
from slmkit.sources.hf_dir import GUARD_KEY, guard_config, model_config, read_config

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


def _stored_grid(scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 grid with its scale rounded to the dtype it is stored in, the minimum still a whole number of steps:
    the weights are rounded on the grid that is saved, so every reader dequantizes exactly what was chosen."""
    zero_point = torch.round(-lo / scale)
    s = scale.to(COMPUTE).float()
    return s, -zero_point * s


def quantize_layer(lin: nn.Linear, scheme: str, group: int | None, method: str, stat: dict[str, torch.Tensor] | None) -> nn.Module:
    """A quantized replacement for `lin`."""
    w = lin.weight.detach().float()  # (N, K)
    smooth = None
    if method == "awq":
        smooth = awq_scales(w, stat["sample"], stat["absmean"], scheme, group)
        w = w * smooth
    if scheme == "int8":
        new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        scales = qo.int8_scales(w).to(COMPUTE).float()  # rounded on the grid that is saved
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
                params["scale"], params["lo"] = _stored_grid(*qo.int4_params(cols, group))

            def qd(col: torch.Tensor, i: int) -> torch.Tensor:
                s, lo = params["scale"][:, 0], params["lo"][:, 0]
                scale_cols[:, i // group], lo_cols[:, i // group] = s, lo
                return torch.round((col - lo) / s).clamp(0, qo.INT4_MAX) * s + lo

            w = qo.gptq(w, stat["H"], qd, group=group, refresh=refresh)
            q, scale, lo = qo.quantize_int4(w, group, (scale_cols, lo_cols))
        else:
            q, scale, lo = qo.quantize_int4(w, group, _stored_grid(*qo.int4_params(w, group)))
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
# Saved in compressed-tensors' pack-quantized layout (ct_layout.py), so transformers and vLLM read the integer weights
# correctly; a child with AWQ's per-channel smoothing has no standard form and is saved guarded (hf_dir.guard_config).
def save_quantized(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    from slmkit.compress import ct_layout

    info = getattr(model.config, CONFIG_KEY)
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    state: dict[str, torch.Tensor] = {}
    integer = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    for name, m in integer.items():
        state |= {f"{name}.{k}": v for k, v in ct_layout.layer_tensors(m, info["scheme"]).items()}
        if m.smooth is not None:
            state[f"{name}.smooth"] = m.smooth
    # float tensors that were not quantized (embeddings, norms) are stored as bf16: half the bytes
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in integer:
            state[k] = v.to(COMPUTE) if v.is_floating_point() and v.dtype == torch.float32 else v
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", "slmkit": "quantized"})
    ignore = sorted(set(linear_layers(model)) - set(integer))
    ct_layout.write_config_block(folder, ct_layout.quantization_config(info["scheme"], info["group_size"], ignore))
    if info.get("smooth"):
        guard_config(folder, "awq", "AWQ's per-input-channel smoothing (x / s before the integer weights) has no "
                     "compressed-tensors form; slmkit loads it, `slmkit export` writes GGUF")


def is_quantized(folder: Path) -> bool:
    return (folder / "config.json").is_file() and CONFIG_KEY in read_config(folder)


def is_standard(folder: Path) -> bool:
    """Whether a quantized child is saved in compressed-tensors' layout that other tools read (not AWQ-smoothed,
    not from slmkit <= 0.5)."""
    config = read_config(folder)
    return "quantization_config" in config and GUARD_KEY not in config


def load_quantized(folder: Path) -> nn.Module:
    """Rebuild the architecture from config.json, swap in quantized shells, fill them from the saved integers."""
    from safetensors import safe_open

    from slmkit.compress import ct_layout

    config = model_config(folder)
    info = getattr(config, CONFIG_KEY)
    standard = getattr(config, "quantization_config", None) is not None  # else the layout of slmkit <= 0.5
    if standard:
        del config.quantization_config  # the skeleton is float; the integer layers are ours
    # the float skeleton is built without memory, then the saved tensors are assigned in place: no full-size
    # float copy ever exists
    model = empty_skeleton(config, torch.float32)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for name in info["modules"]:
        lin = model.get_submodule(name)
        if info["scheme"] == "int8":
            shell = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        else:
            shell = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, info["group_size"])
        if info.get("smooth"):
            shell.smooth = torch.ones(lin.in_features, dtype=COMPUTE)
        if standard:
            local = {k[len(name) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(name + ".")]}
            if "weight_packed" not in local:
                raise SlmkitError(f"the quantized file in {folder} lacks {name}", "Quantize the model again.")
            ct_layout.fill_layer(shell, local, info["scheme"])
            if info.get("smooth"):
                shell.smooth = local["smooth"].to(COMPUTE)
        set_module(model, name, shell)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if standard:
        missing = [k for k in missing if k.rpartition(".")[0] not in info["modules"]]
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
