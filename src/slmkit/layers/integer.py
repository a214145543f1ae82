"""Linear layers holding real integer weights, computed with torch's CPU weight-only kernels.

Decoding (a few rows at a time) calls the integer kernels with bfloat16 activations (they are several times
slower with float32 ones on CPU); prefill and scoring (many rows) dequantize the weight on the fly and use a
float32 matmul, which is faster there (bf16 matmuls are slow on CPUs without AMX). Outputs come back in the
input's dtype; a loaded quantized model keeps its activations in bf16. Int4 keeps the portable nibble-packed weight as its saved state and builds the kernel's own packed layout at
load time, so files do not depend on a torch build's internal layout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slmkit.layers.int_packing import quantize_groups, quantize_rows, unpack_nibbles
from slmkit.layers.walk import set_module
from slmkit.native import cpu_id, ops as native_ops

COMPUTE = torch.bfloat16
KERNEL_MAX_ROWS = 16  # up to this many rows the integer kernel wins; above, dequantize + float32 matmul
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default  # resolved once: per-call lookup costs µs on a 200-call step
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


DEQUANT_ROWS = 4096  # weight rows dequantized at a time while training (a (4096, K) float32 block, not (N, K))


def _row_blocks(layer: nn.Module) -> list[slice]:
    """The weight rows dequantized together: all at once up to DEQUANT_ROWS, else blocks of that many."""
    n = layer.out_features
    return [slice(None)] if n <= DEQUANT_ROWS else [slice(r, min(r + DEQUANT_ROWS, n)) for r in range(0, n, DEQUANT_ROWS)]


def _dequantized_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x (M, K) float32 @ W^T with W dequantized a block of rows at a time -> (M, N)."""
    blocks = _row_blocks(layer)
    if len(blocks) == 1:
        return torch.nn.functional.linear(x, layer.dequantized())
    y = x.new_empty((x.shape[0], layer.out_features))
    for rows in blocks:
        y[:, rows] = torch.nn.functional.linear(x, layer.dequantized(rows))
    return y


class _Recomputed(torch.autograd.Function):
    """y = x W^T with W dequantized again in backward rather than kept from forward, a block of rows at a time:
    training through integer layers (QLoRA: gradients flow to adapters before them) never holds a float copy of
    the frozen weights, not even of one whole layer (the untied output head's would be 113 MB on the default model)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x (M, K) float32 -> (M, N)
        ctx.layer = layer
        return _dequantized_linear(x, layer)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # grad (M, N) -> (M, K)
        layer = ctx.layer
        out = None
        for rows in _row_blocks(layer):
            part = grad[:, rows] @ layer.dequantized(rows)
            out = part if out is None else out.add_(part)
        return out, None


def _weight_only_forward(layer: "Int8Linear | Int4Linear", x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Shared by the integer layers: `kernel` (bf16 (M, K) -> (M, N)) for up to KERNEL_MAX_ROWS rows, else the
    dequantized weight in a float32 matmul; then the bias, in the input's dtype and shape."""
    shape = x.shape
    x2 = x.reshape(-1, layer.in_features)  # (M, K)
    if layer.smooth is not None:
        x2 = x2 / layer.smooth.to(x2.dtype)
    if x2.requires_grad and torch.is_grad_enabled():  # training through the frozen integer weights
        y = _Recomputed.apply(x2.float(), layer).to(x.dtype)
    elif x2.shape[0] <= KERNEL_MAX_ROWS:
        y = kernel((x2 if x2.dtype == COMPUTE else x2.to(COMPUTE)).contiguous())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
    else:
        y = _dequantized_linear(x2.float(), layer).to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*shape[:-1], layer.out_features)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b, q int8 per output channel. Optional per-input-channel `smooth` (AWQ)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=COMPUTE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE) if bias else None)
        self.register_buffer("smooth", None)

    def dequantized(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        return self.weight[rows].float() * self.scales[rows].float()[:, None]  # (N, K), or those rows

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing several (same input, outputs side by side); the parts become views of it."""
        bias = parts[0].bias is not None
        fused = cls(parts[0].in_features, sum(p.out_features for p in parts), bias)
        fused.weight = torch.cat([p.weight for p in parts])
        fused.scales = torch.cat([p.scales for p in parts])
        fused.bias = torch.cat([p.bias for p in parts]) if bias else None
        start = 0
        for p in parts:  # share storage: no second copy of the weights
            end = start + p.out_features
            p.weight, p.scales = fused.weight[start:end], fused.scales[start:end]
            p.bias = fused.bias[start:end] if bias else None
            start = end
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _weight_only_forward(self, x, lambda x2: _INT8_MM(x2, self.weight, self.scales))


class Int4Linear(nn.Module):
    """y = x @ (q * scale + minimum)^T + b, q 4-bit per group of input columns (tinygemm CPU kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros((out_features, in_features // 2), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones((out_features, groups), dtype=COMPUTE))
        self.register_buffer("mins", torch.zeros((out_features, groups), dtype=COMPUTE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE) if bias else None)
        self.register_buffer("smooth", None)
        self._packed: torch.Tensor | None = None
        self._scales_zeros: torch.Tensor | None = None

    def prepare(self) -> None:
        """Build the kernel layout from the saved state (after loading or quantizing)."""
        q = unpack_nibbles(self.qweight).to(torch.int32)  # (N, K) in [0, 15]
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        zeros = self.mins.float() + 8 * self.scales.float()
        self._scales_zeros = torch.stack([self.scales.float().T, zeros.T], dim=-1).contiguous().to(COMPUTE)  # (K/g, N, 2)

    def dequantized(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        q = unpack_nibbles(self.qweight[rows]).float()  # (N, K), or those rows (a slice or ids)
        n, k = q.shape
        g = q.reshape(n, k // self.group_size, self.group_size)
        return (g * self.scales[rows].float()[..., None] + self.mins[rows].float()[..., None]).reshape(n, k)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is None:  # built when first needed: training never needs it (nor its memory)
            self.prepare()
        return _INT4_MM(x2, self._packed, self.group_size, self._scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _weight_only_forward(self, x, self._kernel)


# W8A8 kernels, chosen per weight shape and number of rows by timing them once per process on this machine:
#   int_mm: torch._int_mm (oneDNN's int8 GEMM on the (N, K) weight read transposed; no extra copy)
#   onednn: oneDNN's quantized linear on a weight prepacked at load (one more int8 copy; faster for many rows on CPUs
#           where it blocks the weight for VNNI)
#   native: slmkit's own kernel (slmkit/native, where built and the CPU has AVX-512 VNNI) on a weight packed at load
#           in 64-column tiles: quantizes the rows, multiplies and scales back in one op
BUCKET_LIMITS = (3, 31)  # rows: 1-3 (decode at batch 1), 4-31 (batched decode), 32+ (prefill)
PROBE_ROWS = (1, 16, 64)  # the rows timed, one per bucket
PROBE_VERSION = 4  # 2: each kernel timed with its activation quantization and scaling; 3: slmkit's native kernel too; 4: on AMX tiles where usable
PROBE_BYTES = 64 << 20  # the timed weights cycle through more bytes than a CPU caches, as a real step streams them
_KERNELS: dict[tuple[int, int], tuple[str, ...]] = {}  # (N, K) -> kernel per bucket
_kernel_file: Any = None  # the JSON file the choices are kept in (use_kernel_cache), if any


def _has_onednn() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()


def _onednn_mm(xq_u8: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(x_q @ w_q^T) * w_scales in float32, for uint8 activations with zero point 128 (int8 + 128)."""
    return torch.ops.onednn.qlinear_pointwise(xq_u8, 1.0, 128, packed, w_scales, zeros, None, 1.0, 0, torch.float32, "none", [], "")


_PINNED = threading.local()  # .bucket, set by same_kernels_as in this thread: every call takes that bucket's kernel


def bucket_of(rows: int) -> int:
    pinned = getattr(_PINNED, "bucket", None)
    if pinned is not None:
        return pinned
    return 0 if rows <= BUCKET_LIMITS[0] else 1 if rows <= BUCKET_LIMITS[1] else 2  # (called by every layer of a step)


@contextmanager
def same_kernels_as(rows: int) -> Iterator[None]:
    """Within it, every integer layer runs the kernel it runs for `rows` rows, whatever rows it gets: a speculative
    check's rows computed exactly as one-token steps would compute them (each kernel's row is bit-identical whatever
    the rows beside it; two kernels round their scaling differently). Per thread: each model's scheduler has its own."""
    saved = getattr(_PINNED, "bucket", None)
    _PINNED.bucket = bucket_of(rows)
    try:
        yield
    finally:
        _PINNED.bucket = saved


def kernel_choices() -> dict[str, list[str]]:
    """The kernels picked so far in this process, per "NxK" shape and row bucket (for reports)."""
    return {f"{n}x{k}": list(v) for (n, k), v in sorted(_KERNELS.items())}


def pick_kernels(n: int, k: int) -> tuple[str, ...]:
    """The fastest kernel per row bucket for an (N, K) int8 weight, timed once per shape with weights that do not
    fit in cache (as in a real step, where every layer's weight comes from memory), each as the layer runs it: from
    float activations to float outputs (its quantization, kernel and scaling)."""
    import time

    if (n, k) in _KERNELS:
        return _KERNELS[(n, k)]
    copies = max(2, min(256, PROBE_BYTES // (n * k)))
    weights = [torch.randint(-127, 127, (n, k), dtype=torch.int8) for _ in range(copies)]
    ones = torch.ones(n)

    def int_mm(x: torch.Tensor) -> None:
        for w in weights:
            q, s = _quantize_rows(x)
            _dequantize_rows(torch._int_mm(q, w.t()), s, ones)

    candidates: dict[str, Callable[[torch.Tensor], None]] = {"int_mm": int_mm}
    if _has_onednn():
        packed = [torch.ops.onednn.qlinear_prepack(w, None) for w in weights]
        zeros = torch.zeros(n, dtype=torch.int64)

        def onednn(x: torch.Tensor) -> None:
            for p in packed:
                q, s = _quantize_rows(x, offset=128)
                _onednn_mm(q, p, ones, zeros).mul_(s)

        candidates["onednn"] = onednn
    native = native_ops()
    if native is not None and native.int8_vnni():  # without VNNI it is a plain C++ loop: not worth timing
        tiles = [native.pack_int8(w) for w in weights]

        def native_kernel(x: torch.Tensor) -> None:
            for p, comp in tiles:
                native.int8_linear(x, p, comp, n, ones)

        candidates["native"] = native_kernel
    times: dict[str, list[float]] = {}
    for name, run in candidates.items():
        times[name] = []
        for m in PROBE_ROWS:
            x = torch.randn(m, k)
            run(x)  # warm up (oneDNN builds its primitive for the shape)
            t0 = time.perf_counter()
            for _ in range(3):
                run(x)
            times[name].append((time.perf_counter() - t0) / (3 * copies) * 1e6)
    _KERNELS[(n, k)] = tuple(min(times, key=lambda c: times[c][b]) for b in range(len(PROBE_ROWS)))
    _write_kernel_choices()
    return _KERNELS[(n, k)]


def machine_key() -> str:
    """What the kernel timings depend on: the torch build, the threads, the CPU (model and flags), whether slmkit's
    int8 kernel is a candidate (SLMKIT_NATIVE=0 or no compiler: choices timed without it)."""
    native = native_ops()
    own = "; slmkit int8" if native is not None and native.int8_vnni() else ""
    own += " (AMX)" if own and native.int8_amx() else ""
    return f"torch {torch.__version__}; {torch.get_num_threads()} threads; {cpu_id()}; probe {PROBE_VERSION}{own}"


def use_kernel_cache(path: Any) -> None:
    """Read the kernel choices timed on this machine before (a JSON file keyed by machine_key), and keep the ones
    timed from now on there too."""
    import json

    global _kernel_file
    _kernel_file = path
    try:
        saved = json.loads(open(path).read()).get(machine_key(), {})
    except (OSError, ValueError):
        saved = {}
    for shape, kernels in saved.items():
        n, k = map(int, shape.split("x"))
        _KERNELS.setdefault((n, k), tuple(kernels))
    if any(f"{n}x{k}" not in saved for n, k in _KERNELS):  # timed in this process before the file was named
        _write_kernel_choices()


def _write_kernel_choices() -> None:
    """Written to a temporary file, then renamed: two processes never leave a half-written file."""
    import json
    import os

    path = _kernel_file
    if path is None:
        return
    try:
        data = json.loads(open(path).read())
    except (OSError, ValueError):
        data = {}
    data[machine_key()] = kernel_choices()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choices are timed again next time
        pass


def _quantize_rows(x2: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """int_packing.quantize_rows, by slmkit's one-pass CPU kernel where it is built (bit-identical, 3 us a row instead of
    18: nine torch ops per call add up over 120 layers per step)."""
    native = native_ops()
    if native is not None and x2.dtype == torch.float32 and x2.dim() == 2:
        return native.quantize_rows(x2, offset)
    return quantize_rows(x2, offset=offset)


def _dequantize_rows(y: torch.Tensor, s: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int32 products (M, N) -> float32 y * s (M, 1) * scales (N,): one pass by slmkit's kernel where it is built."""
    native = native_ops()
    if native is not None:
        return native.dequantize_rows(y, s, scales)
    return y.float().mul_(s).mul_(scales)


class W8A8Linear(Int8Linear):
    """y = (q_x @ q_w^T) * s_x * s_w + b: int8 weights per output channel (float32 scales), activations quantized per
    token at run time, int32 accumulation on the CPU's integer units (torch._int_mm or oneDNN's quantized linear,
    VNNI where the CPU has it). The weights and their fusing (concat) are Int8Linear's; the forward is not."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.scales = torch.ones(out_features, dtype=torch.float32)
        self._kernels: tuple[str, ...] | None = None  # per row bucket, picked by timing (prepare)
        self._packed: torch.Tensor | None = None
        # slmkit's int8 linear op (None where another kernel runs every bucket), and its arguments after x: the weight's
        # packed tiles, 128 x its row sums, N, the scales, bias, smoothing
        self._native: Any = None
        self._native_args: tuple = ()

    def prepare(self, kernels: tuple[str, ...] | None = None) -> None:
        """Pick the kernels for this shape on this machine (timed once per shape; or the kernel per row bucket
        given) and build what they need."""
        self._kernels = kernels or pick_kernels(self.out_features, self.in_features)
        self._packed = None
        if "onednn" in self._kernels:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight.contiguous(), None)
            self._zeros = torch.zeros(self.out_features, dtype=torch.int64)
        self._native = None
        if "native" in self._kernels and native_ops() is not None:  # (chosen in a process that had the kernels)
            tiles, sums = native_ops().pack_int8(self.weight)
            bias = None if self.bias is None else self.bias.float()
            smooth = None if self.smooth is None else self.smooth.float()
            self._native, self._native_args = native_ops().int8_linear, (tiles, sums, self.out_features, self.scales, bias, smooth)

    def step_tensors(self) -> list[torch.Tensor]:
        """The four tensors native.decode_step reads for this layer: packed tiles, 128 x row sums, scales, bias (or an
        empty tensor)."""
        tiles, sums, _, scales, bias, _ = self._native_args
        return [tiles, sums, scales, torch.empty(0) if bias is None else bias]

    @classmethod
    def concat(cls, parts: list["Int8Linear"]) -> "W8A8Linear":
        """One layer for several with the same input (q/k/v, gate/up): the activations are quantized once."""
        fused = super().concat(parts)
        for p in parts:
            p._kernels, p._packed, p._native = None, None, None  # prepared again if used alone
        fused.prepare()
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        training = x2.requires_grad and torch.is_grad_enabled()  # training through frozen weights: no integer path
        if not training and self._kernels is None:
            self.prepare()
        kernel = None if training else self._kernels[bucket_of(x2.shape[0])]
        if kernel == "native" and self._native is not None and x2.dtype == torch.float32:  # (the step's common case: lean)
            return self._native(x2, *self._native_args).reshape(*x.shape[:-1], self.out_features)
        if self.smooth is not None:
            x2 = x2 / self.smooth.to(x2.dtype)
        if training:
            y = _Recomputed.apply(x2.float(), self)
        elif kernel == "onednn":
            q, s = _quantize_rows(x2, offset=128)
            y = _onednn_mm(q, self._packed, self.scales, self._zeros).mul_(s)  # the weight scales applied inside
        else:
            q, s = _quantize_rows(x2)  # int_mm (or native without its kernels in this process)
            y = _dequantize_rows(torch._int_mm(q, self.weight.t()), s, self.scales)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class W4A8Linear(Int4Linear):
    """y = sum_g s_g (d_g (q_x . q_w)_g + m_g sum_g q_x) + b: Int4Linear's weights (4-bit per group, a scale and a
    minimum each, bf16) with int8 activations quantized at run time per row and group of the same inputs (a scale s_g
    each, as llama.cpp's Q8_0 activation blocks; W8A8's one scale per row costs several times the perplexity here,
    bench/results/w4a8.md), on the integer units by slmkit's int4 kernel (native/quantize.cpp: nibbles unpacked in
    registers, AVX-512 VNNI or AVX2); a decode step reads 4 + 32 / group bits per weight. Without the kernel (no
    compiler, neither instruction set) the same grid is computed with a dequantized float32 matmul (the same numbers,
    slower). Saved as Int4Linear is."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__(in_features, out_features, bias, group_size)
        self._native: Any = None  # slmkit's int4 linear op, or None
        self._native_args: tuple = ()  # its arguments after x: packed nibbles, scales/minimums, N, bias, smoothing
        self._kernels: tuple[str, ...] | None = None  # per row bucket (as W8A8Linear's): "native" or "dequantize"

    def prepare(self) -> None:
        native = native_ops()
        self._native = None
        if native is not None and native.int4_simd():
            packed, dm = native.pack_int4(unpack_nibbles(self.qweight), self.scales.to(COMPUTE), self.mins.to(COMPUTE))
            bias = None if self.bias is None else self.bias.float()
            smooth = None if self.smooth is None else self.smooth.float()
            self._native, self._native_args = native.int4_linear, (packed, dm, self.out_features, bias, smooth)
        self._kernels = ("native" if self._native is not None else "dequantize",) * len(PROBE_ROWS)

    def step_tensors(self) -> list[torch.Tensor]:
        """The four tensors native.decode_step reads for this layer: packed nibbles, scales/minimums, a (N, 0) tensor
        giving N, bias (or an empty tensor)."""
        packed, dm, n, bias, _ = self._native_args
        return [packed, dm, torch.empty(n, 0), torch.empty(0) if bias is None else bias]

    @classmethod
    def concat(cls, parts: list["W4A8Linear"]) -> "W4A8Linear":
        """One layer for several with the same input (q/k/v, gate/up): the activations are quantized once; the parts
        become views of it."""
        bias = parts[0].bias is not None
        fused = cls(parts[0].in_features, sum(p.out_features for p in parts), bias, parts[0].group_size)
        names = ["qweight", "scales", "mins", *(["bias"] if bias else [])]
        for name in names:
            setattr(fused, name, torch.cat([getattr(p, name) for p in parts]))
        start = 0
        for p in parts:
            end = start + p.out_features
            for name in names:
                setattr(p, name, getattr(fused, name)[start:end])
            p._native, p._kernels = None, None  # prepared again if used alone
            start = end
        fused.prepare()
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        training = x2.requires_grad and torch.is_grad_enabled()  # training through frozen weights: float, no rounding
        if not training and self._kernels is None:
            self.prepare()
        if not training and self._native is not None and x2.dtype == torch.float32:
            return self._native(x2.contiguous(), *self._native_args).reshape(*x.shape[:-1], self.out_features)
        if self.smooth is not None:
            x2 = x2 / self.smooth.to(x2.dtype)
        if training:
            y = _Recomputed.apply(x2.float(), self)
        else:  # the kernel's numbers without it: the int8 groups times the dequantized weight
            y = _dequantized_linear(quantize_groups(x2.float(), self.group_size), self)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class HeadEmbedding(nn.Module):
    """The token embedding read from the integer output head it was tied to (`slmkit quantize --embedding head`): a
    token's row is the head's row dequantized, times the embedding's own scale where the family has one (Gemma's
    sqrt(hidden)); no float table is kept or saved (the default model's bf16 embedding is 56 MB, Gemma 3 270M's 335 MB).
    `weight` is a meta tensor with the table's shape and dtype, for code that reads only those."""

    def __init__(self, head: nn.Module, like: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        object.__setattr__(self, "_head", head)  # not a submodule: the head's tensors are saved once, under the head
        like.weight = nn.Parameter(torch.empty(like.weight.shape, device="meta"), requires_grad=False)  # no table kept
        object.__setattr__(self, "_like", like)  # the family's embedding module, for dense()
        scale = getattr(like, "embed_scale", None)
        self.register_buffer("embed_scale", None if scale is None else scale.detach().float().clone(), persistent=False)
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty((self.num_embeddings, self.embedding_dim), dtype=self.dtype, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., E)
        rows = self._head.dequantized(ids.reshape(-1))
        if self.embed_scale is not None:
            rows = rows * self.embed_scale
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dense(self) -> nn.Module:
        """The family's own embedding module holding the dequantized table (float32)."""
        self._like.weight = nn.Parameter(self._head.dequantized(), requires_grad=False)
        return self._like


def dense_linear(layer: "Int8Linear | Int4Linear | W8A8Linear | W4A8Linear") -> nn.Linear:
    """A float32 nn.Linear computing what the integer layer computes (the smoothing folded into the weight)."""
    w = layer.dequantized()  # (N, K)
    if layer.smooth is not None:
        w = w / layer.smooth.float()[None, :]
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    return lin


INTEGER_LAYERS = (Int8Linear, Int4Linear, W8A8Linear, W4A8Linear)
# the schemes `slmkit quantize` makes: bits per weight, and which quantize their activations to int8 per token at run time
SCHEME_BITS = {"int8": 8, "int4": 4, "w8a8": 8, "w4a8": 4}
INT8_ACTIVATIONS = ("w8a8", "w4a8")


def layer_class(scheme: str) -> type:
    """The integer layer a scheme's linears become."""
    return {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear, "w4a8": W4A8Linear}[scheme]


def to_float(model: nn.Module) -> nn.Module:
    """In place: every integer layer back to a float32 nn.Linear (its dequantized weights) and the rest in float32:
    what adapters trained over integer weights (QLoRA) are merged into, and what training starts from."""
    for name, m in list(model.named_modules()):
        if isinstance(m, HeadEmbedding):
            set_module(model, name, m.dense())
    for name, m in list(model.named_modules()):
        if isinstance(m, INTEGER_LAYERS):
            set_module(model, name, dense_linear(m))
    for p in model.parameters():
        p.data = p.data.float()
    return model
