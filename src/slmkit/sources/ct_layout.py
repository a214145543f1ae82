"""The compressed-tensors layout of slmkit's integer layers: what `slmkit quantize` writes so that transformers, vLLM
and llm-compressor read the child correctly (llm-compressor's formats), and what slmkit reads back.

Conversions only: tensors of one layer <-> the format's tensors, and the config block. The packing is the library's
own (compressed_tensors.compressors.pack_quantized.helpers), so files are what its decompressor expects.

    int8, symmetric per output channel:  w = q * scale   q in [-128, 127]
    int4, asymmetric per group of g:     w = (q - zero_point) * scale   q, zero_point in [-8, 7] (ours: +8, in [0, 15])
    w8a8: int8 weights as int8 (int-quantized), activations int8 per token, dynamic (quantized at run time)
    w4a8: int4's weights, activations int8 per token and group of the weight's group size, dynamic

int4 stays asymmetric (W4A16_ASYM, zero points packed along the output dimension, as llm-compressor writes them and
vLLM reads them): on the default model the symmetric grid costs +64% WikiText-2 perplexity against +6% for this one.
transformers 5.24 with compressed-tensors 0.20 builds the packed zero point with the wrong shape on its default path
and stops with a size-mismatch error (loud, not garbage); `CompressedTensorsConfig(dequantize=True)` loads it right.
"""

from __future__ import annotations

from typing import Any

import torch

from slmkit.layers.integer import COMPUTE, SCHEME_BITS

FORMATS = {"int8": "pack-quantized", "int4": "pack-quantized", "w8a8": "int-quantized", "w4a8": "pack-quantized"}


def weight_args(scheme: str, group: int | None) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if SCHEME_BITS[scheme] == 8:
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group)


def activation_args(scheme: str, group: int | None) -> Any:
    """None (float activations) or int8 at run time: per token (w8a8), per token and group of inputs (w4a8)."""
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "w8a8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    if scheme == "w4a8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=group, dynamic=True)
    return None


def stored_scheme(info: dict[str, Any], module: str) -> str:
    """The scheme a module's tensors are written in: the model's, or the output head's own (`info["head"]`); an int8
    head in a pack-quantized model is packed as int8 is (one format per file)."""
    head = info.get("head") or {}
    if head.get("module") != module:
        return info["scheme"]
    return "int8" if head["scheme"] == "w8a8" and FORMATS[info["scheme"]] == "pack-quantized" else head["scheme"]


def quantization_config(scheme: str, group: int | None, ignore: list[str], head: dict[str, str] | None = None) -> Any:
    """The config block (compressed_tensors' QuantizationConfig) for a model whose every Linear but `ignore` holds
    `scheme` weights (the output head `head["module"]` its own `head["scheme"]`, a second config group targeting it by
    name); activations stay float except for w8a8 and w4a8 (int8, quantized at run time)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weight_args(scheme, group),
                                            input_activations=activation_args(scheme, group))}
    if head:
        h = head["scheme"]
        groups["group_1"] = QuantizationScheme(targets=[head["module"]], weights=weight_args(h, group),
                                               input_activations=activation_args(h, group))
    return QuantizationConfig(config_groups=groups, format=FORMATS[scheme], quantization_status="compressed", ignore=sorted(ignore))


def write_config_block(folder: Any, config: Any) -> None:
    """Add the `quantization_config` block to folder/config.json the way llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=config).update_config(str(folder))


def zero_points(layer: Any) -> torch.Tensor:
    """An Int4Linear's integer zero points (its minimum = -zero_point * scale).  # (N, G) in [0, 15]"""
    return torch.round(-layer.mins.float() / layer.scales.float()).clamp(0, 15).to(torch.uint8)


def layer_tensors(layer: Any, scheme: str) -> dict[str, torch.Tensor]:
    """An integer layer's tensors under the format's local names (weight_packed / weight, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from slmkit.layers.int_packing import unpack_nibbles

    if scheme == "w8a8":  # int-quantized: the int8 weight as it is
        out = {"weight": layer.weight.contiguous(), "weight_scale": layer.scales[:, None].contiguous()}
    else:  # pack-quantized
        if scheme == "int8":
            q, scale = layer.weight, layer.scales[:, None]  # (N, K) int8, (N, 1)
        else:
            q = (unpack_nibbles(layer.qweight).to(torch.int16) - 8).to(torch.int8)  # (N, K) in [-8, 7]
            scale = layer.scales  # (N, G)
        out = {"weight_packed": pack_to_int32(q.contiguous(), SCHEME_BITS[scheme]), "weight_scale": scale.contiguous(),
               "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
        if SCHEME_BITS[scheme] == 4:
            zero = (zero_points(layer).to(torch.int16) - 8).to(torch.int8)  # (N, G) in [-8, 7]
            out["weight_zero_point"] = pack_to_int32(zero.contiguous(), 4, packed_dim=0)
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


def fill_layer(layer: Any, tensors: dict[str, torch.Tensor], scheme: str) -> None:
    """The inverse of layer_tensors: set an empty integer layer's buffers from the format's tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from slmkit.layers.int_packing import pack_nibbles

    if scheme == "w8a8":
        layer.weight, layer.scales = tensors["weight"], tensors["weight_scale"][:, 0].float().contiguous()
    else:
        shape = torch.Size(tensors["weight_shape"].tolist())
        q = unpack_from_int32(tensors["weight_packed"], SCHEME_BITS[scheme], shape)  # (N, K) int8
        scale = tensors["weight_scale"].to(layer.scales.dtype)  # bf16; float32 for a w8a8 head stored as int8
        if scheme == "int8":
            layer.weight, layer.scales = q, scale[:, 0].contiguous()
        else:
            layer.qweight, layer.scales = pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8)), scale
            if "mins" in tensors:  # a guarded child with free minimums (quantize.choose_int4_grid)
                layer.mins = tensors["mins"].to(COMPUTE)
            else:
                zero = unpack_from_int32(tensors["weight_zero_point"], 4, scale.shape, packed_dim=0).to(torch.int16) + 8  # (N, G)
                layer.mins = (-zero.float() * scale.float()).to(COMPUTE)
    if "bias" in tensors:
        layer.bias = tensors["bias"].to(COMPUTE)
