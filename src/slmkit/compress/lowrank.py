"""Low-rank factorization of a model: choose ranks, replace linear layers by LowRankLinear (layers/lowrank.py),
save, load back, and multiply back to dense where a format cannot hold two thin layers (GGUF). Math in
lowrank_ops.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.compress import lowrank_ops as lo
from slmkit.compress.calibrate import collect_stats
from slmkit.errors import SlmkitError
from slmkit.sources.forms import LOWRANK_KEY
from slmkit.layers.lowrank import LowRankLinear
from slmkit.layers.walk import block_linears, count_params, set_module



def factorize(model: nn.Module, batches: list[torch.Tensor], *, ratio: float | None = None, energy: float | None = None) -> dict[str, Any]:
    """Replace decoder-block linears by activation-aware rank-r factors, in place: ranks by `energy` (each layer keeps
    that share of its whitened output energy) or allocated across layers so the model keeps `ratio` of its
    parameters. A layer whose factors would not be smaller stays dense."""
    layers = block_linears(model)
    total = count_params(model)
    dense = sum(m.weight.numel() for m in layers.values())
    stats = collect_stats(model, layers, batches, hessian=True)
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with progress.bar("whitened SVD", total=len(layers)) as advance:
        for name, lin in layers.items():
            parts[name] = lo.whitened_svd(lin.weight.detach().float(), lo.whitening(stats[name]["H"]))
            advance(1)
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in layers.items()}
    if energy is not None:
        ranks = {name: lo.energy_rank(parts[name][1], energy) for name in layers}
    else:
        budget = int(total * (ratio or 0)) - (total - dense)
        if budget < sum(n + k for n, k in shapes.values()):
            raise SlmkitError(f"keeping {ratio:.0%} of {total:,} parameters leaves no room for the layers' factors "
                              f"({total - dense:,} parameters are embeddings and norms)", "Use a higher --ratio.")
        ranks = lo.allocate_ranks({name: (parts[name][1], *shapes[name]) for name in layers}, budget)
    kept: dict[str, int] = {}
    with torch.no_grad():
        for name, lin in layers.items():
            n, k = shapes[name]
            r = min(ranks[name], min(n, k))
            if lo.lowrank_params(n, k, r) >= n * k:
                continue  # no smaller as factors: stays dense
            up, down = lo.factors(*parts[name], r)
            new = LowRankLinear(k, n, r, lin.bias is not None)
            new.up.weight.copy_(up)
            new.down.weight.copy_(down)
            if lin.bias is not None:
                new.up.bias.copy_(lin.bias.detach())
            set_module(model, name, new)
            kept[name] = r
    setattr(model.config, LOWRANK_KEY, {"ranks": kept})
    after = count_params(model)
    return {"ranks": kept, "factorized": len(kept), "dense_layers": len(layers) - len(kept), "params_before": total,
            "params_after": after}


def densify(model: nn.Module) -> int:
    """Multiply every LowRankLinear back into a dense nn.Linear, in place (for formats without factorized layers);
    returns how many were multiplied back."""
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            lin = nn.Linear(m.in_features, m.out_features, bias=m.up.bias is not None, dtype=m.up.weight.dtype)
            lin.weight.copy_(m.dense_weight())
            if m.up.bias is not None:
                lin.bias.copy_(m.up.bias)
            set_module(model, name, lin)
    if hasattr(model.config, LOWRANK_KEY):
        delattr(model.config, LOWRANK_KEY)
    return len(names)
