"""How each model family's decoder block differs from Llama's: one table the lean forward, its slot cache, the native
decode kernels and multi-LoRA batching read (engine/lean_forward.py), so a family is a table entry plus tests.

A block here is: norm -> attention (q/k/v, optional per-head q/k norms, rotary, optional sliding window) -> o ->
[optional norm] -> residual add; norm -> gated MLP (act(gate) * up -> down) -> [optional norm] -> residual add.
What varies by family is which modules hold those norms, whether RMSNorm scales by `weight` or `1 + weight`, and
which modules q/k/v and gate/up come from (three and two, or one each); what varies by checkpoint (activation, attention scale, rope bases and
windows per layer, logit soft-capping) is read from the model's own config and modules by `describe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """A decoder block's layout. Norm fields name modules of each decoder layer (None: the family has no such norm)."""

    attn_norm: str = "input_layernorm"  # before attention
    attn_out_norm: str | None = None  # on attention's output, before the residual add (Gemma 2/3)
    mlp_norm: str = "post_attention_layernorm"  # before the MLP
    mlp_out_norm: str | None = None  # on the MLP's output, before the residual add (Gemma 2/3)
    norm_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1)
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # where q, k, v come from, in order
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # (Phi-3: one fused layer each)

    @property
    def lora_groups(self) -> dict[str, tuple[str, ...]]:
        """The modules whose LoRA factors serve as one fused pair per group (layers/multi_lora.py), by group."""
        return {"qkv": self.qkv, "o": ("self_attn.o_proj",), "gate_up": self.gate_up, "down": ("mlp.down_proj",)}


LLAMA = Family()
GEMMA = Family(attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
               mlp_out_norm="post_feedforward_layernorm", norm_offset=1.0)
FAMILIES: dict[str, Family] = {  # transformers' model_type -> layout
    "llama": LLAMA,  # SmolLM2, Llama 2/3, TinyLlama
    "mistral": LLAMA,  # sliding window on every layer
    "qwen2": LLAMA,  # q/k/v biases (computed by the modules themselves); windows on the layers `layer_types` names
    "qwen3": LLAMA,  # + an RMSNorm per query and key head (found on the modules: q_norm, k_norm)
    "phi3": Family(qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",)),
    "gemma3_text": GEMMA,  # + q/k head norms, GeGLU, embeddings scaled by sqrt(hidden), local and global rope bases
}
MULTI_LORA_TYPES = tuple(FAMILIES)  # served LoRA adapters batch per row over one base (layers/multi_lora.py) in every family
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # angles by position alone (longrope: per context side)


@dataclass(frozen=True)
class Block:
    """One model's blocks as the lean forward runs them: its family's layout plus what its config chose."""

    family: Family
    act: str  # the MLP's gate activation, as transformers names it: silu, gelu_pytorch_tanh, ...
    scale: float  # attention scores scale (Gemma: query_pre_attn_scalar ** -0.5)
    head_norms: bool  # RMSNorm on each query and key head before the rotation (Qwen3, Gemma 3)
    windows: tuple[int | None, ...]  # per layer: the keys a query sees reach back this many positions (None: all)
    rope_keys: tuple[str | None, ...]  # per layer: the rotary table it uses (Gemma 3: by layer type; None: the one table)
    final_softcap: float | None  # logits = c * tanh(logits / c) where set (Gemma 2)

    @property
    def step_flags(self) -> int | None:
        """The block as native.decode_step's flags (1: q/k head norms, 2: norms on the attention's and the MLP's
        outputs, 4: GeGLU gate), or None where that kernel cannot run it whole."""
        fam = self.family
        sandwich = fam.attn_out_norm is not None
        if sandwich != (fam.mlp_out_norm is not None) or self.act not in ("silu", "gelu_pytorch_tanh", "gelu_new"):
            return None
        return (1 if self.head_norms else 0) | (2 if sandwich else 0) | (4 if self.act != "silu" else 0)


def unsupported(model: Any) -> str | None:
    """Why the lean forward cannot run `model` (None: it can). Asked before anything is built."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    if not hasattr(getattr(model, "model", None), "layers"):
        return "the model has no decoder layers where its family keeps them"
    rope = getattr(cfg, "rope_parameters", None) or {}
    ropes = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    if any(float(r.get("partial_rotary_factor", 1.0) or 1.0) < 1.0 for r in ropes):
        return "rotary embeddings cover part of each head"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logits are soft-capped"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "attention is bidirectional (an embedding model)"
    return None


def describe(model: Any) -> Block:
    """The Block of a supported transformers model (see `unsupported`), read from its config and modules."""
    cfg = model.config
    layers = list(model.model.layers)
    attn = layers[0].self_attn
    rope = model.model.rotary_emb
    per_type = isinstance(getattr(rope, "rope_type", None), dict)  # Gemma 3: one table per layer type
    types = list(getattr(cfg, "layer_types", None) or [])
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    windows = []
    for layer in layers:
        a = layer.self_attn
        w = a.sliding_window if hasattr(a, "sliding_window") else getattr(cfg, "sliding_window", None)  # Mistral, Phi-3: every layer
        windows.append(int(w) if w else None)
    return Block(
        family=FAMILIES[cfg.model_type],
        act=getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"),
        scale=float(getattr(attn, "scaling", head_dim ** -0.5)),
        head_norms=hasattr(attn, "q_norm"),
        windows=tuple(windows),
        rope_keys=tuple(types[i] if per_type else None for i in range(len(layers))),
        final_softcap=getattr(cfg, "final_logit_softcapping", None) or None,
    )
