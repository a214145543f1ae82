"""Importance matrices for llama.cpp's quantizer: mean squared activation per input channel of every weight matrix.

llama.cpp weighs each column's rounding error by how large its input activations are on real text (the same statistic
its `llama-imatrix` tool gathers). We gather it with forward hooks on the PyTorch model over calibration text, key it
by GGUF tensor name, hand it to `llama_model_quantize`, and save it in llama.cpp's own imatrix GGUF format so it can
be reused. An imatrix file made by `llama-imatrix` is accepted as input too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmkit.compress.calibrate import CALIB_SAMPLES, CALIB_WINDOW
from slmkit.errors import SlmkitError
from slmkit.export.gguf import tensor_names
from slmkit.card import read_config

GGUF_MAGIC = b"GGUF"


@dataclass
class Imatrix:
    """Sums of squared inputs and row counts per GGUF weight name (what llama.cpp stores as .in_sum2 / .counts)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        """What the quantizer wants: the mean squared activation per input channel (1 where nothing was seen)."""
        return {k: (s / self.counts[k]).astype(np.float32) if self.counts[k] > 0 else np.ones_like(s, dtype=np.float32)
                for k, s in self.sums.items()}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def compute_imatrix(folder: Path, text: Path, *, window: int = CALIB_WINDOW, samples: int = CALIB_SAMPLES) -> Imatrix:
    """Run the float model of a store folder over `text` and collect per-channel sums of x^2 for every Linear."""
    import torch

    from slmkit.compress.calibrate import calibration_batches, collect_stats
    from slmkit.layers.walk import linear_layers
    from slmkit.sources.hf_dir import load_float

    config = read_config(folder)
    names = tensor_names(config)
    net, tokenizer = load_float(folder, dtype=torch.float32, what="Loading the float model for the importance matrix")
    window = min(window, config.get("max_position_embeddings") or window)
    batches = calibration_batches(tokenizer, text, window=window, samples=samples, option="--imatrix")
    stats = collect_stats(net, linear_layers(net), batches, hessian=False)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for hf_name, s in stats.items():
        target = names.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
        if target is None or s["n"] == 0:
            continue
        sums[target] = (s["sqmean"] * s["n"]).numpy()
        counts[target] = int(s["n"])
    return Imatrix(sums, counts, datasets=[str(text)], chunk_count=len(batches), chunk_size=window)


def write_imatrix_gguf(imatrix: Imatrix, path: Path) -> None:
    """Save in llama.cpp's imatrix GGUF layout (`NAME.in_sum2`, `NAME.counts`, imatrix.* keys) for `llama-quantize`."""
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama.cpp's imatrix files carry no architecture
    w.add_type("imatrix")
    w.add_array(gguf.Keys.IMatrix.DATASETS, imatrix.datasets)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        w.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(imatrix.counts[name])]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix_gguf(path: Path) -> Imatrix:
    """Read an imatrix GGUF (ours or `llama-imatrix`'s); one expert (dense models) per tensor."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field_type = reader.get_field(gguf.Keys.General.TYPE)
    if field_type is None or field_type.contents() != "imatrix":
        raise SlmkitError(f"{path} is a GGUF file but not an importance matrix",
                          "Pass calibration text, or an imatrix .gguf made by `slmkit export --imatrix` or llama-imatrix.")
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, data in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = tensors.get(f"{base}.counts")
        if c is None or c.size != 1:
            raise SlmkitError(f"imatrix entry {base} has {0 if c is None else c.size} counts",
                              "Only dense (one-expert) imatrix files are supported.")
        sums[base] = data.reshape(-1)
        counts[base] = int(c.reshape(-1)[0])
    if not sums:
        raise SlmkitError(f"{path} holds no importance data", "Recompute it from calibration text: --imatrix TEXT.")
    chunk_count = reader.get_field(gguf.Keys.IMatrix.CHUNK_COUNT)
    chunk_size = reader.get_field(gguf.Keys.IMatrix.CHUNK_SIZE)
    datasets = reader.get_field(gguf.Keys.IMatrix.DATASETS)
    return Imatrix(sums, counts, datasets=list(datasets.contents()) if datasets else [],
                   chunk_count=int(chunk_count.contents()) if chunk_count else 0,
                   chunk_size=int(chunk_size.contents()) if chunk_size else 0)


def expected_widths(folder: Path) -> dict[str, int]:
    """GGUF weight name -> input width, from the safetensors headers of a store folder (no weights read)."""
    from safetensors import safe_open

    config = read_config(folder)
    names = tensor_names(config)
    widths: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                target = names.get_name(key, try_suffixes=(".weight",)) if len(shape) == 2 else None
                if target is not None:
                    widths[target] = int(shape[1])
    return widths


def check_fits(imatrix: Imatrix, folder: Path, source: Path) -> None:
    """Refuse an importance matrix made for another model, before llama.cpp's quantizer aborts on it."""
    widths = expected_widths(folder)
    shared = set(imatrix.sums) & set(widths)
    if not shared:
        raise SlmkitError(f"the importance matrix {source} names none of this model's weights",
                          "It was made for another model: compute one for this model with --imatrix TEXT.")
    for name in sorted(shared):
        if imatrix.sums[name].size != widths[name]:
            raise SlmkitError(
                f"the importance matrix {source} has {imatrix.sums[name].size} values for {name}, which takes "
                f"{widths[name]} inputs", "It was made for another model shape: compute one for this model with --imatrix TEXT.")


def load_or_compute(spec: Path, folder: Path) -> tuple[Imatrix, bool]:
    """An imatrix from `spec`: read it when it is an imatrix GGUF, else compute it from `spec` as text.

    Returns (imatrix, computed)."""
    if not spec.is_file():
        raise SlmkitError(f"imatrix data {spec} not found",
                          "Pass --imatrix with a plain-text calibration file (a few hundred KB is plenty) or an imatrix .gguf.")
    if spec.stat().st_size == 0:
        raise SlmkitError(f"imatrix data {spec} is empty", "Pass --imatrix with a non-empty plain-text file.")
    if is_gguf(spec):
        imatrix = read_imatrix_gguf(spec)
        check_fits(imatrix, folder, spec)
        return imatrix, False
    return compute_imatrix(folder, spec), True
