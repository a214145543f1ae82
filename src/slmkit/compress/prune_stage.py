"""`prune`: the store stages that take a model and put a pruned child back, with lineage.

- `prune_stage`: unstructured or N:M sparsity (magnitude, Wanda, SparseGPT); the file stays dense.
- `shrink_stage`: structured pruning to a parameter target, by depth (whole blocks) or width (KV groups and MLP
  channels): a smaller dense Llama that plain transformers loads, GGUF export converts and both engines run.
- `scan`: per-block importance and the calibration-perplexity cost of dropping each block, without writing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit.card import ModelCard
from slmkit.compress import prune as pr
from slmkit.compress.calibrate import CALIB_SAMPLES, CALIB_WINDOW, calibration_for
from slmkit.compress.parents import float_parent
from slmkit.compress.prune_ops import parse_pattern
from slmkit.errors import SlmkitError
from slmkit.layers.walk import count_params, decoder_blocks
from slmkit.sources.hf_dir import float_writer, load_float
from slmkit.store import Store, validate_name

STRUCTURES = ("depth", "width")
RANKINGS = ("influence", "perplexity")  # how depth pruning ranks blocks (the first is the default)
DEFAULT_METHOD = "wanda"  # sparsity without weight updates that needs only activations
SCAN_SAMPLES = 8  # --scan runs the model once per block: fewer, shorter windows
SCAN_WINDOW = 256
DENSE_NOTE = "dense file: pruned weights are stored as zeros (no smaller on disk, no faster on a CPU)"


def _default_name(model: str, suffix: str) -> str:
    return validate_name(f"{model}-{suffix}")


def _install(store: Store, name: str, net: nn.Module, tokenizer: Any, *, model: str, settings: dict[str, Any]) -> ModelCard:
    return store.derive(name, float_writer(net, tokenizer, name), stage="prune", parent=model, settings=settings,
                        parameters=count_params(net))


def prune_stage(
    model: str, *, method: str = DEFAULT_METHOD, sparsity: float | None = None, pattern: str | None = None,
    calib: Path | None = None, samples: int = CALIB_SAMPLES, window: int = CALIB_WINDOW, name: str | None = None,
    store: Store | None = None,
) -> ModelCard:
    """Unstructured (`sparsity` of every row) or N:M (`pattern`) pruning of every decoder-block linear layer."""
    store = store or Store()
    if method not in pr.METHODS:
        raise SlmkitError(f"unknown method {method!r}", f"Methods: {', '.join(pr.METHODS)}")
    if (sparsity is None) == (pattern is None):
        raise SlmkitError("give one of --sparsity (for example 0.5) or --pattern (for example 2:4)", "Pass exactly one of them.")
    if sparsity is not None and not 0 < sparsity < 1:
        raise SlmkitError(f"sparsity {sparsity} is outside (0, 1)", "Use a share of weights to remove, for example 0.5.")
    try:
        nm = parse_pattern(pattern) if pattern else None
    except ValueError as exc:
        raise SlmkitError(str(exc), "Use N:M with 0 < N < M, for example 2:4.") from None
    folder, _ = float_parent(store, model)
    name = name or _default_name(model, f"{method}-{f'{nm[0]}of{nm[1]}' if nm else f'{round(sparsity * 100)}pct'}")
    validate_name(name)
    store.check_free(name)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    if nm:
        pr.check_pattern(net, nm)
    batches, calib_info = calibration_for(tokenizer, net, calib, samples, window) if method != "magnitude" else (None, None)
    report = pr.sparsify(net, method, sparsity=sparsity, nm=nm, batches=batches)
    settings = {"kind": "unstructured" if nm is None else "n:m", "method": method, "sparsity": sparsity,
                "pattern": pattern, "measured": {k: v for k, v in report.items() if k != "layers"},
                "layers": report["layers"], "calibration": calib_info, "storage": DENSE_NOTE}
    return _install(store, name, net, tokenizer, model=model, settings=settings)


def parse_count(text: str) -> int:
    """'70M' -> 70_000_000; '1.2B', '500K', or a plain number."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in "KMB" else t) * scale
    except ValueError:
        raise SlmkitError(f"cannot read {text!r} as a parameter count", "Write it like 70M, 1.2B or 70000000.") from None
    return int(value)


def shrink_stage(
    model: str, *, structured: str, target_params: int | None = None, ratio: float | None = None, blocks: int | None = None,
    rank: str = RANKINGS[0],
    calib: Path | None = None, samples: int = CALIB_SAMPLES, window: int = CALIB_WINDOW, name: str | None = None,
    store: Store | None = None,
) -> ModelCard:
    """Structured pruning to `target_params` (or `ratio` of the parameters): whole blocks (depth) or KV groups and
    MLP channels (width), ranked on calibration data; depth can also name how many `blocks` to remove. The child is
    a smaller dense model with a consistent config."""
    store = store or Store()
    if structured not in STRUCTURES:
        raise SlmkitError(f"unknown --structured {structured!r}", f"Use one of: {', '.join(STRUCTURES)}")
    if rank not in RANKINGS:
        raise SlmkitError(f"unknown --rank {rank!r}", f"Use one of: {', '.join(RANKINGS)}")
    if blocks is not None and structured != "depth":
        raise SlmkitError("--blocks applies to --structured depth", "Give width pruning a --target-params or --ratio.")
    if sum(x is not None for x in (target_params, ratio, blocks)) != 1:
        raise SlmkitError("give one of --target-params (for example 70M), --ratio (for example 0.7) or, for depth, --blocks",
                          "Pass exactly one of them.")
    if ratio is not None and not 0 < ratio < 1:
        raise SlmkitError(f"ratio {ratio} is outside (0, 1)", "Use the share of parameters to keep, for example 0.7.")
    folder, card = float_parent(store, model)
    total = card.parameters or 0
    target = target_params if target_params is not None else int(total * (ratio or 0))
    if blocks is not None:
        if blocks < 1:
            raise SlmkitError(f"--blocks {blocks}: remove at least one block", "Give a positive number of blocks.")
        target = total - 1  # placeholder: the block count decides
    if total and target >= total:
        raise SlmkitError(f"the target {target:,} is not below {model}'s {total:,} parameters", "Aim lower.")
    suffix = (f"depth-minus{blocks}" if blocks is not None else
              f"{structured}-{target / 1e6:.0f}m" if target >= 1e6 else f"{structured}-{target / 1e3:.0f}k")
    name = name or _default_name(model, suffix)
    validate_name(name)
    store.check_free(name)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    before = count_params(net)
    batches, calib_info = calibration_for(tokenizer, net, calib, samples, window)
    _, stack = decoder_blocks(net)
    settings: dict[str, Any] = {"kind": "structured", "structured": structured,
                                "target_params": target if blocks is None else None, "ratio": ratio, "remove_blocks": blocks,
                                "params_before": before, "calibration": calib_info}
    if structured == "depth":
        per_block = sum(p.numel() for p in stack[0].parameters())
        n_drop = blocks if blocks is not None else math.ceil((before - target) / per_block)
        if n_drop >= len(stack):
            raise SlmkitError(f"that leaves no decoder block ({len(stack)} blocks of {per_block:,} parameters)",
                              "Aim higher: at least one block must stay.")
        # influence: 1 - cos(in, out); perplexity: the calibration perplexity without the block (lower: less needed)
        scores = pr.block_importance(net, batches) if rank == "influence" else pr.perplexity_without_each_block(net, batches)
        drop = sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:n_drop])
        pr.drop_blocks(net, drop)
        settings |= {"rank": rank, "block_importance": scores, "dropped_blocks": drop, "blocks": len(stack) - len(drop)}
    else:
        kv, channels = pr.width_plan(net, target)
        scores = pr.width_importance(net, batches)
        heads_before, inter_before = net.config.num_attention_heads, net.config.intermediate_size
        pr.prune_width(net, scores, kv_groups=kv, channels=channels)
        settings |= {"attention_heads": [heads_before, net.config.num_attention_heads], "kv_heads": kv,
                     "intermediate_size": [inter_before, channels]}
    settings["params_after"] = count_params(net)
    return _install(store, name, net, tokenizer, model=model, settings=settings)


def scan(model: str, *, calib: Path | None = None, samples: int = SCAN_SAMPLES, window: int = SCAN_WINDOW,
         store: Store | None = None) -> dict[str, Any]:
    """Per block: its block influence (1 - cos of input and output) and the calibration perplexity with that block
    removed; per linear layer: the share of its Wanda score mass 50% sparsity would remove. Nothing is written."""
    store = store or Store()
    folder, _ = float_parent(store, model)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    batches, calib_info = calibration_for(tokenizer, net, calib, samples, window)
    influence = pr.block_importance(net, batches)
    base = math.exp(pr.mean_nll(net, batches))
    _, blocks = decoder_blocks(net)
    without = pr.perplexity_without_each_block(net, batches)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    return {"model": model, "calibration": calib_info, "perplexity": base, "params": count_params(net),
            "params_per_block": per_block, "layers": pr.layer_sensitivity(net, batches),
            "blocks": [{"block": i, "influence": bi, "perplexity_without": p, "cost": p / base - 1}
                       for i, (bi, p) in enumerate(zip(influence, without))]}
