"""`lowrank`: the store stage that replaces a model's linear layers by activation-aware low-rank factors."""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit.card import ModelCard
from slmkit.compress.calibrate import CALIB_SAMPLES, CALIB_WINDOW, calibration_for
from slmkit.compress.lowrank import factorize
from slmkit.compress.parents import float_parent
from slmkit.errors import SlmkitError
from slmkit.sources.hf_dir import float_writer, guard_config, load_float
from slmkit.store import Store, validate_name


def lowrank_stage(
    model: str, *, ratio: float | None = None, energy: float | None = None, calib: Path | None = None,
    samples: int = CALIB_SAMPLES, window: int = CALIB_WINDOW, name: str | None = None, store: Store | None = None,
) -> ModelCard:
    """Factorize `model`'s decoder-block linears to keep `ratio` of its parameters, or `energy` of each layer's
    whitened output energy, into a new store model."""
    store = store or Store()
    if (ratio is None) == (energy is None):
        raise SlmkitError("give one of --ratio (share of the parameters to keep, e.g. 0.6) or --energy (e.g. 0.95)", "Pass exactly one.")
    for label, value in (("ratio", ratio), ("energy", energy)):
        if value is not None and not 0 < value < 1:
            raise SlmkitError(f"--{label} {value} is outside (0, 1)", f"Give --{label} as a share, for example 0.6.")
    folder, _ = float_parent(store, model)
    name = validate_name(name or f"{model}-lowrank-{round(100 * (ratio or energy or 0))}{'pct' if ratio else 'e'}")
    store.check_free(name)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    batches, calib_info = calibration_for(tokenizer, net, calib, samples, window)
    info = factorize(net, batches, ratio=ratio, energy=energy)
    settings = {"ratio": ratio, "energy": energy, "method": "activation-aware SVD (whitened by the calibration inputs' Cholesky factor)",
                "calibration": calib_info, **info,
                "storage": "each factorized layer as two thin linears (NAME.down, NAME.up); slmkit loads it; GGUF export multiplies them back"}

    def write(staging: Path) -> None:
        float_writer(net, tokenizer, name)(staging)
        guard_config(staging, "lowrank", "factorized layers (NAME.down, NAME.up) have no standard form; slmkit loads "
                     "them, `slmkit export` multiplies them back into GGUF")

    return store.derive(name, write, stage="lowrank", parent=model, settings=settings, parameters=info["params_after"])
