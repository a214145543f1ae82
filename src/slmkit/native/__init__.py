"""slmkit's own CPU kernels, where torch has no fused one for the shapes the lean forward runs:
- decode.cpp: a decode step's attention over the slot cache (one query token per row, each row's own length, the
  query heads of a KV head together; the rotary embedding and the new key and value written on the way), RMSNorm
  with its residual add, the MLP's SiLU gate: one call each where torch's take 5-15 small ops;
- quantize.cpp: W8A8's int8 linear (per-token activation quantization, int8 x int8 on the integer units with AVX-512
  VNNI, scaling back; on weights packed once in 64-column tiles), W4A8's int4 linear (the same with 4-bit weights in
  groups, unpacked in registers; AVX-512 VNNI or AVX2), and the per-token quantizer and its way back from
  int32 for torch's int8 kernels; bit-identical to torch's ops they replace.

Built from the C++ next to this file on first use with torch's extension builder (a C++ compiler and ninja are
needed; `-march=native`, so each machine gets code for its own CPU), kept where torch keeps built extensions
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) in slmkit/NAME_KEY, KEY a digest of the source, flags,
torch version and CPU, and loaded as torch ops. Without a compiler, or with SLMKIT_NATIVE=0, `ops()` is None and callers use
torch's own operations (same results, slower); `unavailable()` says why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from slmkit import cpu_build

HERE = Path(__file__).resolve().parent
# one library per source: the decode step's kernels want vectorized expf and sums (-ffast-math), the W8A8 ones exact
# float arithmetic (bit-identical to quant_ops.quantize_rows and torch's scaling)
SOURCES = {"slmkit_decode": ("decode.cpp", ["-ffast-math"]), "slmkit_quantize": ("quantize.cpp", ["-ffp-contract=off"])}
BASE_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # every library's: code for this machine's CPU, OpenMP threads
_why_not = ""


@functools.cache
def cpu_id() -> str:
    """This CPU: its model name and a digest of its feature flags (what timings and -march=native code depend on)."""
    return cpu_build.cpu_id()


def unavailable() -> str:
    """Why the kernels are not in use ('' when they are, or before the first ops() call)."""
    return _why_not


@functools.cache
def ops() -> SimpleNamespace | None:
    """The kernels as torch ops (rope_decode_attention, add_rms_norm, silu_mul, gelu_tanh_mul, top_logsumexp, quantize_rows, dequantize_rows, pack_int8, int8_linear, int8_vnni, int8_amx, pack_int4, int4_linear, int4_simd),
    built once per machine; None when they cannot be."""
    global _why_not
    from slmkit import progress
    from slmkit.config import settings

    _why_not = ""
    config = settings()
    if not config.native:
        _why_not = "SLMKIT_NATIVE=0"
        return None
    # the ninja that pip installed with slmkit sits beside this Python, which need not be on PATH (no activated venv):
    # torch's builder runs it by name
    here = str(Path(sys.executable).parent)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
    if shutil.which(config.cxx) is None or shutil.which("ninja") is None:
        _why_not = "no C++ compiler (c++ or $CXX) or ninja on PATH: install g++ (and pip's ninja) to build them"
    else:
        try:
            for name, (source, flags) in SOURCES.items():
                _build(name, HERE / source, flags, config.kernel_dir)
        except Exception as exc:  # a failed build is not fatal: torch's own operations compute the same
            _why_not = f"building them failed: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}"
    if _why_not:
        progress.note(f"[yellow]note:[/] slmkit's CPU kernels are not in use ({_why_not}); torch's operations compute the same, slower")
        return None
    decode = torch.ops.slmkit_decode
    return SimpleNamespace(rope_decode_attention=decode.rope_decode_attention,
                           add_rms_norm=decode.add_rms_norm, silu_mul=decode.silu_mul,
                           gelu_tanh_mul=decode.gelu_tanh_mul, decode_step=decode.decode_step,
                           top_logsumexp=decode.top_logsumexp,
                           quantize_rows=torch.ops.slmkit_quantize.quantize_rows,
                           dequantize_rows=torch.ops.slmkit_quantize.dequantize_rows,
                           pack_int8=torch.ops.slmkit_quantize.pack_int8, int8_linear=torch.ops.slmkit_quantize.int8_linear,
                           int8_vnni=torch.ops.slmkit_quantize.int8_vnni, int8_amx=torch.ops.slmkit_quantize.int8_amx,
                           pack_int4=torch.ops.slmkit_quantize.pack_int4, int4_linear=torch.ops.slmkit_quantize.int4_linear,
                           int4_simd=torch.ops.slmkit_quantize.int4_simd)


def _build(name: str, source: Path, flags: list[str], root: Path) -> None:
    """Compile (or find already compiled) and load one library; torch's builder locks its folder, so two processes
    never build it at once."""
    from torch.utils import cpp_extension

    from slmkit import progress

    cflags = [*BASE_FLAGS, *flags]
    key = hashlib.sha256(source.read_bytes() + " ".join(cflags).encode() + f"{torch.__version__} {cpu_id()}".encode()).hexdigest()[:12]
    module = f"{name}_{key}"
    folder = root / module
    folder.mkdir(parents=True, exist_ok=True)
    built = (folder / f"{module}.so").exists()
    with contextlib.nullcontext() if built else progress.step(f"Compiling slmkit's CPU kernels ({source.name}; once per machine, ~10 s)"):
        cpp_extension.load(name=module, sources=[str(source)], extra_cflags=cflags, build_directory=str(folder),
                           is_python_module=False, verbose=False)
