"""`slmkit doctor`: what this machine can do for slmkit, and for each problem the one command that fixes it.

Every fact is read, never assumed: the CPU's flags as /proc/cpuinfo lists them (Linux lists only what the kernel
enables) and AMX as the kernel grants it; the llama.cpp build's features as llama.cpp itself prints them (in a child
process: a build for another CPU may die at load) and the guard's verdict; slmkit's kernels as built; torch's
threads and the W8A8 kernel choices timed here; the store and the evaluation data as found now.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmkit import cpu_build
from slmkit.config import settings
from slmkit.engine import llamacpp_guard
from slmkit.store import Store

# CPU features that decide which kernels can run (the rest of the flags list is noise here)
RELEVANT = ("sse4_2", "avx", "f16c", "fma", "bmi2", "avx2", "avx_vnni", "avx512f", "avx512cd", "avx512vl", "avx512dq",
            "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
# llama.cpp's system_info names -> the CPU flags each needs (for its GGML_* options: cpu_build's table)
PRINTED = ("AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8")
LLAMA_FEATURES = {"SSE3": ("pni",), "SSSE3": ("ssse3",),
                  **{option.removeprefix("GGML_"): needs for option, needs, _ in cpu_build.X86_OPTIONS + cpu_build.AMX_OPTIONS
                     if option.removeprefix("GGML_") in PRINTED}}
LOW_DISK = 2 << 30
SYSTEM_INFO = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"


@dataclass
class Problem:
    what: str
    fix: str


@dataclass
class Report:
    cpu: dict[str, Any] = field(default_factory=dict)
    llama_cpp: dict[str, Any] = field(default_factory=dict)
    native: dict[str, Any] = field(default_factory=dict)
    torch: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def llama_features(system_info: str) -> dict[str, bool]:
    """`llama_print_system_info()`'s `NAME = 0/1` pairs (CPU section), e.g. {'AVX2': True, 'AMX_INT8': False}."""
    return {name: value == "1" for name, value in re.findall(r"\b([A-Z0-9_]+) = ([01])\b", system_info)}


def compare_build(features: dict[str, bool], flags: frozenset[str], *, amx_opt_in: bool) -> list[Problem]:
    """Pure: what a llama.cpp build's compiled features mean on a CPU with `flags`."""
    problems = []
    missing = [n for n, on in features.items() if on and n in LLAMA_FEATURES and not set(LLAMA_FEATURES[n]) <= flags]
    make = "make install   (in an slmkit checkout: rebuilds llama.cpp for this CPU, keeps a wheel per CPU and flags)"
    if missing:
        problems.append(Problem(f"llama.cpp was built for instructions this CPU lacks: {', '.join(missing)}", make))
    if features.get("AMX_INT8") and not amx_opt_in and not missing:
        problems.append(Problem("llama.cpp was built with ggml's AMX path, which dies with an illegal instruction on some "
                                "CPUs (the guard below says whether it does on this one)", make))
    unused = [n for n, need in LLAMA_FEATURES.items() if n in features and not features[n] and set(need) <= flags
              and (n != "AMX_INT8" or amx_opt_in)]
    if unused:
        problems.append(Problem(f"llama.cpp does not use this CPU's {', '.join(unused)} (slower than it could be)", make))
    return problems


def _cpu(report: Report) -> frozenset[str]:
    cpu = cpu_build.read_cpu()
    state = cpu_build.os_state()
    report.cpu = {"model": cpu.model, "arch": cpu.arch, "cores": _cores(), "features": [f for f in RELEVANT if f in cpu.flags],
                  "os": state}
    if cpu.has_amx and state.get("amx_permitted") is False:
        report.cpu["amx_note"] = "the CPU lists AMX but the kernel does not grant its tile state to this process"
    return cpu.flags


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _llama_cpp(report: Report, flags: frozenset[str], probe: bool) -> None:
    directory = llamacpp_guard.package_dir()
    if directory is None:
        report.llama_cpp = {"installed": False}
        report.problems.append(Problem("llama-cpp-python is not installed (GGUF files cannot run, export cannot quantize)",
                                       "make install   (or: pip install llama-cpp-python)"))
        return
    build = cpu_build.library_id(directory)
    known = cpu_build.read_builds(settings().machine_cache).get(build)
    info = {"installed": True, "version": llamacpp_guard.version(), "path": str(directory), "build": build,
            "built_by": "slmkit, for this CPU" if known else "not slmkit (pip's default build, or a prebuilt wheel)",
            "cmake_args": known["cmake_args"] if known else None}
    child = subprocess.run([sys.executable, "-c", SYSTEM_INFO], capture_output=True, text=True, timeout=120)
    if child.returncode != 0:
        info["system_info"] = None
        report.problems.append(Problem(f"llama.cpp cannot even load here ({llamacpp_guard.describe_exit(child.returncode, child.stdout, child.stderr)})",
                                       "make install   (rebuilds it for this CPU)"))
    else:
        features = llama_features(child.stdout)
        info["features"] = [n for n, on in features.items() if on]
        report.problems += compare_build(features, flags, amx_opt_in=cpu_build.amx_requested())
    verdict = llamacpp_guard.check() if probe else llamacpp_guard.cached(build)
    info["guard"] = asdict(verdict) if verdict else "not checked yet (slmkit doctor without --no-probe checks it)"
    if verdict is not None and not verdict.ok:
        report.problems.append(Problem(f"llama.cpp dies on this CPU: {verdict.detail}; slmkit uses the PyTorch engine instead",
                                       llamacpp_guard.rebuild_hint()))
    report.llama_cpp = info


def _native(report: Report) -> None:
    from slmkit import native

    ops = native.ops()
    report.native = {"in_use": ops is not None, "why_not": native.unavailable() or None, "where": str(settings().kernel_dir),
                     "flags": native.BASE_FLAGS, "int8_isa": ("AVX-512 VNNI" + (", AMX tiles at 4+ rows" if ops.int8_amx() else "") if ops.int8_vnni() else "plain C++")
                     if ops else None}
    if ops is None and settings().native:
        report.problems.append(Problem(f"slmkit's CPU kernels are not in use: {native.unavailable()}",
                                       "apt-get install g++   (or set CXX to a C++ compiler); pip install ninja"))


def _torch(report: Report) -> None:
    import torch

    from slmkit.layers import integer

    path = settings().kernel_choices_file
    try:
        choices = json.loads(path.read_text()).get(integer.machine_key())
    except (OSError, ValueError):
        choices = None
    report.torch = {"version": torch.__version__, "threads": torch.get_num_threads(), "slmkit_threads": settings().threads,
                    "w8a8_kernel_choices": choices or "not timed on this machine yet (timed on the first W8A8 load)",
                    "w8a8_kernel_file": str(path)}


def _store(report: Report) -> None:
    store = Store()
    root = store.root
    cards, unreadable = store.scan()
    models = [c.name for c in cards]
    broken = [{"name": n, "reason": why} for n, why in unreadable.items()]
    usage = shutil.disk_usage(root if root.exists() else _existing_parent(root))
    report.store = {"path": str(root), "models": models, "broken": broken, "free_bytes": usage.free}
    for b in broken:
        report.problems.append(Problem(f"store folder {b['name']} is broken ({b['reason']})",
                                       f"slmkit models rm {b['name']}   (or move {root / b['name']} away)"))
    if usage.free < LOW_DISK:
        report.problems.append(Problem(f"only {usage.free >> 20} MiB free where the store is",
                                       "free disk space, or set SLMKIT_HOME to a folder on a larger disk"))


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _data(report: Report) -> None:
    from slmkit.data.catalog import DATASETS
    from slmkit.data.locate import where

    for ds in DATASETS.values():
        for f, w in zip(ds.files, where(ds.name)):
            report.data.append({"name": ds.name, "file": f.path, "found": w.origin, "path": str(w.path) if w.path else None})


def diagnose(*, probe: bool = True) -> Report:
    """Everything above, gathered; `probe=False` reports the llama.cpp guard's kept verdict without running it."""
    report = Report()
    flags = _cpu(report)
    _llama_cpp(report, flags, probe)
    _native(report)
    _torch(report)
    _store(report)
    _data(report)
    return report
