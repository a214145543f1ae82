"""Calibration: token windows from a text file, and the per-layer activation statistics gathered over them with
forward hooks. Shared by every stage that looks at real activations: quantize (AWQ's mean |x|, GPTQ's Hessian),
export's importance matrix (mean x^2), and pruning and low-rank (Wanda's ||x||, SparseGPT's Hessian)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.card import sha256_file
from slmkit.data.locate import locate
from slmkit.errors import SlmkitError

CALIB_WINDOW = 512
CALIB_SAMPLES = 32
MIN_SAMPLES = 4
SAMPLE_ROWS, SAMPLE_PER_BATCH = 1024, 64  # activation rows kept per layer for AWQ's and SmoothQuant's searches


def calibration_batches(
    tokenizer: Any, path: Path, *, window: int = CALIB_WINDOW, samples: int = CALIB_SAMPLES, option: str = "--calib"
) -> list[torch.Tensor]:
    """Consecutive token windows from a text file (the first `samples` of them); `option` names it in errors."""
    if not path.is_file():
        raise SlmkitError(f"calibration file {path} not found", f"Pass {option} with a plain-text file (a few hundred KB is plenty).")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SlmkitError(f"calibration file {path} is empty", f"Pass {option} with a non-empty plain-text file.")
    ids = tokenizer.encode(text[: window * samples * 8], add_special_tokens=False)
    batches = [torch.tensor([ids[i : i + window]]) for i in range(0, len(ids) - 1, window)][:samples]
    return [b for b in batches if b.shape[1] > 1]


def calibration_for(tokenizer: Any, net: nn.Module, calib: Path | None, samples: int, window: int) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """A stage's calibration windows (from `calib`, else the public-domain sample shipped with slmkit) and what the
    card records of them."""
    if samples < MIN_SAMPLES:
        raise SlmkitError(f"{samples} calibration samples are too few to rank weights", f"Use --samples {MIN_SAMPLES} or more (32 is the default).")
    path = calib if calib is not None else locate("calibration")
    window = min(window, getattr(net.config, "max_position_embeddings", None) or window)
    batches = calibration_batches(tokenizer, path, window=window, samples=samples)
    if len(batches) < MIN_SAMPLES:
        raise SlmkitError(f"{path} gives only {len(batches)} windows of {window} tokens", "Give a longer calibration text, or a smaller --window.")
    info = {"file": str(path) if calib is not None else "packaged: " + path.name, "sha256": sha256_file(path),
            "windows": len(batches), "window": window}
    return batches, info


def collect_stats(model: nn.Module, layers: dict[str, nn.Linear], batches: list[torch.Tensor], *, hessian: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: mean |x| (AWQ), max |x| (SmoothQuant) and mean x^2 (llama.cpp's imatrix, Wanda's norm) per input channel and, when asked,
    H = 2/n X^T X (GPTQ, SparseGPT), from calibration inputs run through the whole model."""

    def run() -> None:
        with progress.bar("calibration", total=len(batches)) as advance:
            for ids in batches:
                model(input_ids=ids, use_cache=False)
                advance(1)

    return watch_inputs(layers, run, hessian=hessian)


def watch_inputs(layers: dict[str, nn.Module], run: Callable[[], None], *, hessian: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics of collect_stats, gathered with forward hooks on `layers` while `run()` runs forward passes."""
    stats: dict[str, dict[str, Any]] = {
        n: {"n": 0, "absmean": torch.zeros(m.in_features), "absmax": torch.zeros(m.in_features),
            "sqmean": torch.zeros(m.in_features, dtype=torch.float64)}
        for n, m in layers.items()
    }
    if hessian:
        for n, m in layers.items():
            stats[n]["H"] = torch.zeros((m.in_features, m.in_features))

    def hook(name: str) -> Callable:
        def fn(_mod: nn.Module, inputs: tuple, _out: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (T, K)
            s = stats[name]
            total = s["n"] + x.shape[0]
            s["absmean"] = s["absmean"] * (s["n"] / total) + x.abs().sum(0) / total
            s["absmax"] = torch.maximum(s["absmax"], x.abs().amax(0))  # SmoothQuant's per-channel range
            s["sqmean"] = s["sqmean"] * (s["n"] / total) + x.double().square().sum(0) / total
            if hessian:
                s["H"] = s["H"] * (s["n"] / total) + (2.0 / total) * (x.T @ x)
            s["n"] = total
            # rows to score AWQ and SmoothQuant scales against: spread over every batch (each one's first rows,
            # where attention sinks make the largest activations, and evenly spaced ones after)
            rows = x[torch.linspace(0, x.shape[0] - 1, min(SAMPLE_PER_BATCH, x.shape[0])).long()]
            if s.get("sample") is None or s["sample"].shape[0] < SAMPLE_ROWS:
                s["sample"] = rows.clone() if s.get("sample") is None else torch.cat([s["sample"], rows])[:SAMPLE_ROWS]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return stats


class _Captured(Exception):
    pass


@dataclass
class BlockInputs:
    """What the first decoder block receives for every calibration batch: the hidden states (B, T, H), which
    move block to block, and the rest of its call (attention mask, rotary embeddings, positions), which stays."""

    hidden: list[torch.Tensor]
    calls: list[tuple[tuple, dict[str, Any]]]

    def run(self, block: nn.Module, *, advance: bool) -> list[torch.Tensor]:
        """Run `block` on every batch's current hidden states; with `advance`, its outputs become the inputs of the
        next block. Returns the outputs."""
        outs = []
        with torch.inference_mode():
            for h, (args, kwargs) in zip(self.hidden, self.calls):
                out = block(h, *args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        if advance:
            self.hidden = outs
        return outs


def block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> BlockInputs:
    """Run the model up to its first decoder block for every batch and keep what that block is called with (the
    layer-by-layer calibration of Wanda and SparseGPT: each block then sees the outputs of the blocks before it,
    as already pruned)."""
    hidden: list[torch.Tensor] = []
    calls: list[tuple[tuple, dict[str, Any]]] = []

    def catch(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        calls.append((tuple(args[1:]), {**kw, "use_cache": False}))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return BlockInputs(hidden, calls)
