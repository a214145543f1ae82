"""Quantization-aware training to a llama.cpp type (`slmkit quantize --scheme gguf:Q4_0 --method qat --data FILE`).

The model distils from itself: KL to its float parent's cached top-k log-probabilities (the distill core; --alpha
below 1 mixes in the data's next-token loss), while every linear layer of its blocks computes with its weight on the type's grid
(compress/gguf_grid_ops.py: llama.cpp's own rounding, bit for bit) and the gradient passes straight through to the
float weight. What is trained: those weights (and the norms); the embedding (and a separate head) stay as they are,
because llama.cpp gives them a type of its own (Q8_0 or Q6_K) whatever the file's type.

The child holds the grid values themselves as float safetensors: it runs as it is on PyTorch, and `slmkit export
--type TYPE` writes the GGUF with exactly those values (the grid is idempotent: llama.cpp's rounding of a value on
its grid is that value). The validation perplexity "before" on its card is plain rounding to the grid (what
llama-quantize gives without an importance matrix); "after" is the trained child.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.nn.utils import parametrize

from slmkit.card import ModelCard
from slmkit.compress import gguf_grid_ops as gg
from slmkit.errors import SlmkitError
from slmkit.store import Store
from slmkit.train.distill import distill_stage
from slmkit.train.loop import TrainConfig

SCHEME_PREFIX = "gguf:"
STEPS = 200
LR = 2e-5  # small: the weights move across grid cells, not far from the parent
ALPHA = 1.0  # the loss: KL to the float parent only, so the child learns to be its parent on the grid, not the
# training text (with next-token loss mixed in, the text's domain moves it too: bench/results/quality_per_byte.md)


class OnGrid(nn.Module):
    """A parametrization: the weight as the type's grid gives it, gradients straight through."""

    def __init__(self, gguf_type: str) -> None:
        super().__init__()
        self.gguf_type = gguf_type

    def forward(self, w: Any) -> Any:
        return gg.fake_quantize(w, self.gguf_type)


def gguf_type_of(scheme: str) -> str:
    """'gguf:Q4_0' -> 'Q4_0', refused with the types there are."""
    t = scheme[len(SCHEME_PREFIX):].upper() if scheme.lower().startswith(SCHEME_PREFIX) else ""
    if t not in gg.TYPES:
        raise SlmkitError(f"--scheme {scheme}: quantization-aware training knows gguf:{', gguf:'.join(gg.TYPES)}",
                          "k-quants and IQ4_NL pick their scales by search, which training cannot follow yet: export them "
                          "with slmkit export --type (with --imatrix for the best plain rounding).")
    return t


def _block_linears(net: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = net.get_output_embeddings()
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and m is not head]


def attach(net: nn.Module, gguf_type: str) -> Callable[[], dict[str, Any]]:
    """Put every block linear weight of `net` on the grid for training; returns what settles them (the grid values
    become the weights) and says so for the card."""
    layers = _block_linears(net)
    odd = [n for n, m in layers if m.in_features % gg.BLOCK]
    if odd:
        raise SlmkitError(f"{len(odd)} linear layers have rows that are not whole blocks of {gg.BLOCK} ({odd[0]}: {layers[0][1].in_features})",
                          "llama.cpp stores those in another type: this model cannot be trained onto the grid.")
    for module in (net.get_input_embeddings(), net.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)
    for _, m in layers:
        parametrize.register_parametrization(m, "weight", OnGrid(gguf_type))

    def settle() -> dict[str, Any]:
        for _, m in layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return {"qat": {"type": gguf_type, "layers": len(layers), "grid": "llama.cpp's reference rounding (no importance matrix)",
                        "trained": "block linear weights through a straight-through estimator, and the norms; embeddings and head frozen"}}

    return settle


def qat_stage(model: str, scheme: str, data: list[Path], *, steps: int = STEPS, lr: float = LR, alpha: float = ALPHA,
              name: str | None = None, resume: bool = False, store: Store | None = None, **train: Any) -> ModelCard:
    """Install `name` (default MODEL-TYPE-qat): `model` trained onto the grid of a llama.cpp type for `steps`
    optimizer steps on `data` (its own float outputs as the teacher; `alpha` < 1 mixes in the next-token loss of
    the data); `train` goes to TrainConfig."""
    gguf_type = gguf_type_of(scheme)
    name = name or f"{model}-{gguf_type.lower().replace('_', '')}-qat"
    return distill_stage(model, model, data, alpha=alpha, config=TrainConfig(steps=steps, lr=lr, **train), name=name,
                         resume=resume, store=store, prepare=lambda net: attach(net, gguf_type), stage="qat")
