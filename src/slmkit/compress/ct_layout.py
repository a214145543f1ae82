"""The compressed-tensors layout of slmkit's integer layers: what `slmkit quantize` writes so that transformers, vLLM
and llm-compressor read the child correctly (llm-compressor's "pack-quantized" format), and what slmkit reads back.

Conversions only: tensors of one layer <-> the format's tensors, and the config block. The packing is the library's
own (compressed_tensors.compressors.pack_quantized.helpers), so files are what its decompressor expects.

    int8, symmetric per output channel:  w = q * scale   q in [-128, 127]
    int4, symmetric per group of g:      w = q * scale   q in [-8, 7] (ours: q + 8 in [0, 15], minimum = -8 * scale)

Both are symmetric: asymmetric pack-quantized children (packed zero points) do not load in transformers 5 with
compressed-tensors 0.20 (size mismatch on weight_zero_point), and vLLM's W4A16 kernels take the symmetric form.
"""

from __future__ import annotations

from typing import Any

import torch

FORMAT = "pack-quantized"
BITS = {"int8": 8, "int4": 4}


def weight_args(scheme: str, group: int | None) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "int8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)


def quantization_config(scheme: str, group: int | None, ignore: list[str]) -> Any:
    """The config block (compressed_tensors' QuantizationConfig) for a model whose every Linear but `ignore` holds
    `scheme` weights; activations stay float (weight-only)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme_ = QuantizationScheme(targets=["Linear"], weights=weight_args(scheme, group))
    return QuantizationConfig(config_groups={"group_0": scheme_}, format=FORMAT, quantization_status="compressed",
                              ignore=sorted(ignore))


def write_config_block(folder: Any, config: Any) -> None:
    """Add the `quantization_config` block to folder/config.json the way llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=config).update_config(str(folder))


def layer_tensors(layer: Any, scheme: str) -> dict[str, torch.Tensor]:
    """An Int8Linear / Int4Linear's tensors under the format's local names (weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from slmkit.compress.quant_ops import unpack_nibbles

    if scheme == "int8":
        q, scale = layer.weight, layer.scales[:, None]  # (N, K) int8, (N, 1)
    else:
        q = (unpack_nibbles(layer.qweight).to(torch.int16) - 8).to(torch.int8)  # (N, K) in [-8, 7]
        scale = layer.scales  # (N, G)
    out = {"weight_packed": pack_to_int32(q.contiguous(), BITS[scheme]), "weight_scale": scale.contiguous(),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


def fill_layer(layer: Any, tensors: dict[str, torch.Tensor], scheme: str) -> None:
    """The inverse of layer_tensors: set an empty Int8Linear / Int4Linear's buffers from the format's tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from slmkit.compress.quant_ops import pack_nibbles
    from slmkit.layers.integer import COMPUTE

    shape = torch.Size(tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], BITS[scheme], shape)  # (N, K) int8
    scale = tensors["weight_scale"].to(COMPUTE)
    if scheme == "int8":
        layer.weight, layer.scales = q, scale[:, 0].contiguous()
    else:
        layer.qweight = pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))
        layer.scales, layer.mins = scale, (-8 * scale.float()).to(COMPUTE)
    if "bias" in tensors:
        layer.bias = tensors["bias"].to(COMPUTE)
