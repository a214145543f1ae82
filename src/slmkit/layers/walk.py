"""Walking a model: find its linear layers and decoder blocks by type and shape, replace modules, and build an
empty skeleton from a config. Nothing is found by hard-coded paths (`model.model.layers`), so a wrapped or
differently named model is walked the same way."""

from __future__ import annotations

from typing import Any

from torch import nn


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear by its qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module called `name` (a dotted path from model.named_modules()) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest nn.ModuleList of same-typed modules (its dotted name too)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder blocks (no nn.ModuleList of one block type)")
    return best


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder blocks' linear layers by qualified name (embeddings and the output head left out)."""
    name, blocks = decoder_blocks(model)
    return {f"{name}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in linear_layers(b).items()}


def count_params(model: nn.Module) -> int:
    """Parameters, tied weights counted once (model.parameters() yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def empty_skeleton(config: Any, dtype: Any) -> nn.Module:
    """The architecture of `config` with parameters on the meta device (no memory); buffers such as rotary
    frequencies are real. Load weights into it with load_state_dict(..., assign=True)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
