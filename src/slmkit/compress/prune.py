"""Pruning a model: walk its decoder blocks, score what to remove (math in prune_ops.py), and change the model.

- `sparsify`: unstructured or N:M sparsity inside every linear layer of the decoder blocks, block by block on
  calibration inputs that already went through the pruned blocks before (as Wanda and SparseGPT do). The
  weights stay dense tensors with zeros: no smaller, no faster on a CPU (the card says so).
- `block_importance` / `drop_blocks`: depth pruning, whole decoder blocks removed.
- `width_importance` / `prune_width`: attention KV groups (with their query heads) and MLP channels removed,
  the same number in every block so the config stays one plain Llama config.
Blocks and layers are found by type (layers/walk.py); width pruning needs the Llama layout's projection names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.compress import prune_ops as po
from slmkit.compress.calibrate import block_inputs, collect_stats, watch_inputs
from slmkit.errors import SlmkitError
from slmkit.layers.walk import block_linears, count_params, decoder_blocks, linear_layers, set_module

METHODS = ("magnitude", "wanda", "sparsegpt")
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def prunable_params(model: nn.Module) -> int:
    """Weights of the linear layers inside the decoder blocks (what sparsity is measured over)."""
    return sum(m.weight.numel() for m in block_linears(model).values())


def measured_sparsity(model: nn.Module) -> dict[str, Any]:
    """The real share of zero weights: over the decoder blocks' linear layers, and over every parameter."""
    zeros = sum(int((m.weight == 0).sum()) for m in block_linears(model).values())
    total_params = count_params(model)
    return {"linear_sparsity": zeros / max(prunable_params(model), 1), "overall_sparsity": zeros / total_params,
            "zero_weights": zeros}


# ---- unstructured and N:M -----------------------------------------------------------------------------------
def sparsify(model: nn.Module, method: str, *, sparsity: float | None = None, nm: tuple[int, int] | None = None,
             batches: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Zero weights in every decoder-block linear: `sparsity` of each row, or N:M. Wanda and SparseGPT need
    calibration `batches`; they run block by block on inputs that passed the already pruned blocks."""
    _, blocks = decoder_blocks(model)
    inputs = block_inputs(model, blocks, batches) if method != "magnitude" and batches else None
    if method != "magnitude" and inputs is None:
        raise SlmkitError(f"{method} needs calibration text", "Pass --calib FILE, or use --method magnitude.")
    per_layer: dict[str, float] = {}
    with torch.no_grad(), progress.bar(f"pruning ({method}, {f'{nm[0]}:{nm[1]}' if nm else f'{sparsity:.0%}'})", total=len(blocks)) as advance:
        for index, block in enumerate(blocks):
            lins = linear_layers(block)
            stats = watch_inputs(lins, lambda: inputs.run(block, advance=False), hessian=method == "sparsegpt") if inputs else None
            for name, lin in lins.items():
                w = lin.weight.detach().float()  # (N, K)
                if method == "sparsegpt":
                    new = po.sparsegpt(w, stats[name]["H"], sparsity=sparsity or 0.0, nm=nm)
                else:
                    score = po.magnitude_scores(w) if method == "magnitude" else po.wanda_scores(w, stats[name]["sqmean"].float().sqrt())
                    new = w * (po.nm_mask(score, *nm) if nm else po.row_mask(score, sparsity or 0.0))
                lin.weight.copy_(new.to(lin.weight.dtype))
                per_layer[f"{index}.{name}"] = po.sparsity_of(lin.weight)
            if inputs is not None:
                inputs.run(block, advance=True)
            advance(1)
    return {**measured_sparsity(model), "layers": per_layer}


def check_pattern(model: nn.Module, nm: tuple[int, int]) -> None:
    _, blocks = decoder_blocks(model)
    bad = sorted({m.in_features for m in block_linears(model).values() if m.in_features % nm[1]})
    if bad:
        raise SlmkitError(f"the pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; this model has {bad}",
                          "Pick an M that divides every layer's input width (4 and 8 usually do).")


# ---- depth ------------------------------------------------------------------------------------------------------
def block_importance(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """Block influence of every decoder block on the calibration data: mean over tokens of 1 - cos(in, out)."""
    _, blocks = decoder_blocks(model)
    inputs = block_inputs(model, blocks, batches)
    scores = []
    with progress.bar("block importance", total=len(blocks)) as advance:
        for block in blocks:
            before = inputs.hidden
            after = inputs.run(block, advance=True)
            bi = torch.cat([po.block_influence(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])) for a, b in zip(before, after)])
            scores.append(float(bi.mean()))
            advance(1)
    return scores


def mean_nll(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood over calibration windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in batches:
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def perplexity_without_each_block(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """Calibration perplexity with each decoder block skipped in turn (its input passed through unchanged)."""
    _, blocks = decoder_blocks(model)

    def skip(_mod: nn.Module, args: tuple, kwargs: dict[str, Any], _out: Any) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    out = []
    with progress.bar("perplexity without each block", total=len(blocks)) as advance:
        for block in blocks:
            handle = block.register_forward_hook(skip, with_kwargs=True)
            try:
                out.append(math.exp(mean_nll(model, batches)))
            finally:
                handle.remove()
            advance(1)
    return out


def layer_sensitivity(model: nn.Module, batches: list[torch.Tensor], sparsity: float = 0.5) -> dict[str, list[float]]:
    """Per linear layer type (q_proj, ..., down_proj), per block: the share of its Wanda score mass that pruning
    `sparsity` of each row would remove, from one calibration pass."""
    layers = block_linears(model)
    stats = collect_stats(model, layers, batches, hessian=False)
    out: dict[str, list[float]] = {}
    for full, lin in layers.items():
        kind = full.rsplit(".", 1)[-1]
        out.setdefault(kind, []).append(po.wanda_loss_share(lin.weight.detach().float(), stats[full]["sqmean"].float().sqrt(), sparsity))
    return out


def drop_blocks(model: nn.Module, drop: list[int]) -> None:
    """Remove decoder blocks `drop` and renumber the rest, config included (num_hidden_layers and any per-layer list)."""
    name, blocks = decoder_blocks(model)
    gone = set(drop)
    keep = [b for i, b in enumerate(blocks) if i not in gone]
    set_module(model, name, nn.ModuleList(keep))
    for i, block in enumerate(keep):
        for m in block.modules():
            if hasattr(m, "layer_idx"):  # attention modules index the KV cache by it
                m.layer_idx = i
    cfg = model.config
    n = cfg.num_hidden_layers
    for key, value in list(vars(cfg).items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(cfg, key, [v for i, v in enumerate(value) if i not in gone])
    cfg.num_hidden_layers = len(keep)


# ---- width ------------------------------------------------------------------------------------------------------
def llama_layout(model: nn.Module) -> None:
    _, blocks = decoder_blocks(model)
    names = set(linear_layers(blocks[0]))
    missing = [n for n in ATTN + MLP if n not in names]
    if missing:
        raise SlmkitError(f"width pruning needs the Llama layout of projections; this model lacks {missing}",
                          "Use --structured depth, or unstructured pruning (--method ...), for this architecture.")


def width_importance(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per block: a score per KV group (its query heads' output norms x o_proj's columns) and per MLP channel
    (its activation norm x down_proj's columns), from one calibration pass over the dense model."""
    llama_layout(model)
    name, blocks = decoder_blocks(model)
    layers = {f"{name}.{i}.{p}": block.get_submodule(p) for i, block in enumerate(blocks) for p in ("self_attn.o_proj", "mlp.down_proj")}
    stats = collect_stats(model, layers, batches, hessian=False)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    out: dict[str, list[torch.Tensor]] = {"kv_groups": [], "channels": []}
    for i, block in enumerate(blocks):
        o, down = block.get_submodule("self_attn.o_proj"), block.get_submodule("mlp.down_proj")
        ch = po.channel_scores(stats[f"{name}.{i}.self_attn.o_proj"]["sqmean"].float(), o.weight.detach().float())
        out["kv_groups"].append(po.group_scores(po.group_scores(ch, head_dim), group))
        out["channels"].append(po.channel_scores(stats[f"{name}.{i}.mlp.down_proj"]["sqmean"].float(), down.weight.detach().float()))
    return out


def _slice_linear(lin: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def prune_width(model: nn.Module, scores: dict[str, list[torch.Tensor]], *, kv_groups: int, channels: int) -> None:
    """Keep the `kv_groups` best KV groups (a KV head and its query heads) and the `channels` best MLP channels
    in every block; the config follows (heads, KV heads, head_dim, intermediate_size)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    _, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        kv = po.keep_top(scores["kv_groups"][i], kv_groups)  # kept KV heads, in order
        kv_ch = (kv[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # their K/V rows
        q_heads = (kv[:, None] * group + torch.arange(group)[None, :]).reshape(-1)  # their query heads
        q_ch = (q_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        mlp = po.keep_top(scores["channels"][i], channels)
        for path, kw in (("self_attn.q_proj", {"rows": q_ch}), ("self_attn.k_proj", {"rows": kv_ch}),
                         ("self_attn.v_proj", {"rows": kv_ch}), ("self_attn.o_proj", {"cols": q_ch}),
                         ("mlp.gate_proj", {"rows": mlp}), ("mlp.up_proj", {"rows": mlp}), ("mlp.down_proj", {"cols": mlp})):
            set_module(block, path, _slice_linear(block.get_submodule(path), **kw))
    cfg.head_dim = head_dim
    cfg.num_attention_heads = kv_groups * group
    cfg.num_key_value_heads = kv_groups
    cfg.intermediate_size = channels


def width_plan(model: nn.Module, target: int, *, multiple: int = 32, min_channels: float = 0.125) -> tuple[int, int]:
    """(KV groups, MLP channels) per block that bring the parameter count down to `target`: MLP channels go first
    (Minitron finds the MLP the cheapest to prune), KV groups only when the MLP alone would fall below
    `min_channels` of its width. Channels are a multiple of `multiple` (int4 groups, kernel tiles), rounded down."""
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    _, blocks = decoder_blocks(model)
    n_blocks = len(blocks)
    fixed = count_params(model) - sum(count_params(b) for b in blocks)
    norms = sum(p.numel() for p in blocks[0].parameters() if p.dim() == 1)  # per block, kept whole
    for kv in range(cfg.num_key_value_heads, 0, -1):
        attn = hidden * head_dim * (2 * kv * group + 2 * kv)  # q and o: kv*group heads; k and v: kv heads
        per_channel = 3 * hidden  # gate and up rows, one down column
        budget = (target - fixed) / n_blocks - attn - norms
        channels = int(budget // per_channel) // multiple * multiple
        if channels >= max(multiple, min_channels * inter):
            return kv, min(channels, inter)
    raise SlmkitError(f"a target of {target:,} parameters leaves too little for the blocks",
                      f"Width pruning keeps at least one KV group and {min_channels:.0%} of the MLP; aim higher, or add --structured depth.")


