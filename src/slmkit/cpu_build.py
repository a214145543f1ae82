"""This CPU's instruction sets, and the llama.cpp build that runs on it.

pip builds llama-cpp-python from source with ggml's default `GGML_NATIVE` (`-march=native`), which compiles ggml's AMX
path on CPUs that list AMX; on some of them that path dies with an illegal instruction at the first multi-token
prompt. slmkit builds llama.cpp for exactly the instruction sets this CPU lists (`GGML_NATIVE=OFF`, every ggml
option said ON or OFF), without the AMX path unless the user opts in (`SLMKIT_LLAMA_AMX=1`).

Standard library only, no slmkit imports: the Makefile runs this file before slmkit is installed
(`python3 src/slmkit/cpu_build.py ensure --python .venv/bin/python`), and it sits below every other module.

Wheels are kept per build key (llama-cpp-python version, CMake arguments, Python tag, machine) under
`$SLMKIT_MACHINE_CACHE/wheels/KEY/` and pip's own wheel cache is never used for them, so a rebuild never picks up a
wheel built with other flags, and a fresh clone on the same machine installs the kept one in seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "llama-cpp-python"
AMX_ENV = "SLMKIT_LLAMA_AMX"  # 1: build ggml's AMX path where the CPU lists it (off by default: it crashes on some)
MACHINE_CACHE_ENV = "SLMKIT_MACHINE_CACHE"

# ggml's x86 options (vendor/llama.cpp/ggml/CMakeLists.txt) -> the /proc/cpuinfo flags each one compiles for.
# Order matters: an option is only turned on when the ones it extends are (AVX-512 extensions need AVX-512F...).
X86_OPTIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (option, cpuinfo flags it needs, options it needs)
    ("GGML_SSE42", ("sse4_2",), ()),
    ("GGML_AVX", ("avx",), ("GGML_SSE42",)),
    ("GGML_F16C", ("f16c",), ("GGML_AVX",)),
    ("GGML_FMA", ("fma",), ("GGML_AVX",)),
    ("GGML_AVX2", ("avx2",), ("GGML_AVX", "GGML_FMA", "GGML_F16C")),
    ("GGML_BMI2", ("bmi2",), ()),
    ("GGML_AVX_VNNI", ("avx_vnni",), ("GGML_AVX2",)),
    # ggml's GGML_AVX512 compiles -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), ("GGML_AVX2",)),
    ("GGML_AVX512_VBMI", ("avx512vbmi",), ("GGML_AVX512",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",), ("GGML_AVX512",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",), ("GGML_AVX512",)),
)
AMX_OPTIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("GGML_AMX_TILE", ("amx_tile",), ("GGML_AVX512", "GGML_AVX512_VNNI")),
    ("GGML_AMX_INT8", ("amx_int8",), ("GGML_AMX_TILE",)),
    ("GGML_AMX_BF16", ("amx_bf16",), ("GGML_AMX_TILE",)),
)
# Options that cut the build without changing what slmkit uses: llama-cpp-python's multimodal library (mtmd/llava).
BUILD_CUTS = ("-DLLAVA_BUILD=OFF",)


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says of this CPU (Linux lists only the features the kernel enables)."""

    model: str
    arch: str
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def has_amx(self) -> bool:
        return bool({"amx_tile", "amx_int8", "amx_bf16"} & self.flags)


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
    """This machine's CPU model, architecture and flags (empty flags where /proc/cpuinfo is absent)."""
    model, flags = "", frozenset()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    model = model or platform.processor() or platform.machine()
    return Cpu(model=model, arch=platform.machine().lower(), flags=flags)


def cpu_id(cpu: Cpu | None = None) -> str:
    """This CPU in one string: its model name and a digest of its flags (what compiled code and timings depend on)."""
    cpu = cpu or read_cpu()
    return f"{cpu.model} {hashlib.sha256(' '.join(sorted(cpu.flags)).encode()).hexdigest()[:12]}"


def ggml_options(flags: frozenset[str] | set[str], *, amx: bool = False) -> dict[str, bool]:
    """Every ggml x86 instruction-set option, ON exactly where the CPU lists what it compiles for (AMX only when
    asked). Pure: tested on recorded flag sets."""
    chosen: dict[str, bool] = {}
    for option, needs, after in X86_OPTIONS + AMX_OPTIONS:
        wanted = amx or not option.startswith("GGML_AMX")
        chosen[option] = wanted and set(needs) <= set(flags) and all(chosen.get(a, False) for a in after)
    return chosen


def cmake_args(cpu: Cpu, *, amx: bool = False, extra: str = "") -> list[str]:
    """llama-cpp-python's CMAKE_ARGS for this CPU: on x86-64 `GGML_NATIVE=OFF` and each instruction set said
    explicitly; elsewhere llama.cpp's own defaults. `extra` (the user's CMAKE_ARGS) comes last, so it wins."""
    args = list(BUILD_CUTS)
    if cpu.arch in ("x86_64", "amd64"):
        args.append("-DGGML_NATIVE=OFF")
        args += [f"-D{option}={'ON' if on else 'OFF'}" for option, on in ggml_options(cpu.flags, amx=amx).items()]
    return args + shlex.split(extra)


def amx_requested(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    return environ.get(AMX_ENV, "").lower() in ("1", "true", "yes", "on")


def build_key(version: str, args: list[str], python_tag: str | None = None) -> str:
    """One name for a wheel: the package version, the CMake arguments, the Python it is for and the machine type."""
    python_tag = python_tag or f"cp{sys.version_info.major}{sys.version_info.minor}"
    text = json.dumps([PACKAGE, version, args, python_tag, platform.machine()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def machine_cache(environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """Where slmkit keeps what belongs to this machine rather than to a store: llama.cpp wheels by build key, the
    llama.cpp guard's verdicts. `SLMKIT_MACHINE_CACHE`, else `$XDG_CACHE_HOME/slmkit-machine` (~/.cache)."""
    if environ.get(MACHINE_CACHE_ENV):
        return Path(environ[MACHINE_CACHE_ENV]).expanduser()
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "slmkit-machine"


def library_id(package_dir: Path) -> str:
    """A fingerprint of an installed llama-cpp-python's compiled libraries (what the guard and the build record
    are keyed by): the hash of every file under llama_cpp/lib."""
    digest = hashlib.sha256()
    for path in sorted((package_dir / "lib").glob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --- what the OS enables (Linux, x86-64): the register state it saves, and AMX's tile data granted on request ---
ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1021, 0x1022, 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64
# XSAVE state components (Intel SDM vol. 1, 13.1) -> the instruction sets that need the OS to save them
XSTATE = {"avx": (2,), "avx512": (5, 6, 7), "amx": (17, 18)}


def os_state() -> dict[str, object]:
    """The XSAVE features the kernel supports for user space (ARCH_GET_XCOMP_SUPP) read as AVX / AVX-512 / AMX state
    enabled, and whether this process may use AMX tile data (asked with ARCH_REQ_XCOMP_PERM, then
    ARCH_GET_XCOMP_PERM). Values are None where this cannot be asked (not x86-64 Linux, an old kernel)."""
    unknown: dict[str, object] = {"xfeatures": None, **dict.fromkeys(XSTATE), "amx_permitted": None}
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return unknown
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_uint64(0)
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_SUPP, ctypes.byref(mask)) != 0:
            return unknown
        state: dict[str, object] = {"xfeatures": hex(mask.value)}
        state |= {name: all(mask.value >> b & 1 for b in bits) for name, bits in XSTATE.items()}
        permitted = False
        if state["amx"]:
            libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
            perm = ctypes.c_uint64(0)
            libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(perm))
            permitted = bool(perm.value >> XFEATURE_XTILEDATA & 1)
        return state | {"amx_permitted": permitted}
    except (OSError, AttributeError):
        return unknown


# --- building and installing (the Makefile's step; also what `slmkit doctor` tells a user to run) ----------------
def _installed_dir(python: str) -> Path | None:
    code = ("import importlib.util as u; s = u.find_spec('llama_cpp'); "
            "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()
    return Path(out) if out else None


def _python_tag(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                          capture_output=True, text=True, check=True).stdout.strip()


def builds_record(cache: Path) -> Path:
    """library_id -> how it was built (key, version, CMake arguments), for `slmkit doctor` and the next `ensure`."""
    return cache / "llama-cpp-builds.json"


def read_json(path: Path) -> dict:
    """A machine-cache record ({} when missing or unreadable: it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Written to a temporary file, then renamed: a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_builds(cache: Path) -> dict[str, dict]:
    return read_json(builds_record(cache))


def build_wheel(python: str, version: str, args: list[str], out_dir: Path, *,
                environ: dict[str, str] | os._Environ = os.environ, pip_args: tuple[str, ...] = (), quiet: bool = False) -> Path:
    """Build llama-cpp-python `version` into `out_dir` with these CMake arguments (pip wheel, never pip's cache: a
    cached wheel may have been built with other flags); the wheel's path, or an error saying what the build needs."""
    env = {**environ, "CMAKE_ARGS": " ".join(args)}
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    done = subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
                           "-w", str(out_dir), *pip_args, f"{PACKAGE}=={version}"], env=env, capture_output=quiet, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: building {PACKAGE} {version} failed ({'its output is above' if not quiet else done.stderr[-1500:]}). "
                         "It needs a C/C++ compiler and cmake: apt-get install build-essential cmake (or pip install "
                         "cmake), then run this again.")
    return next(Path(out_dir).glob("*.whl"))


def ensure(python: str, version: str, *, cache: Path | None = None, environ: dict[str, str] | os._Environ = os.environ,
           pip_args: tuple[str, ...] = ()) -> str:
    """Make `python`'s llama-cpp-python the one built for this CPU: nothing when the installed libraries are that
    build; else install the kept wheel for this build key, building it first (pip wheel, no pip cache) when there is
    none. Returns what it did, in one line."""
    cache = cache or machine_cache(environ)
    cpu = read_cpu()
    args = cmake_args(cpu, amx=amx_requested(environ), extra=environ.get("CMAKE_ARGS", ""))
    key = build_key(version, args, _python_tag(python))
    installed = _installed_dir(python)
    builds = read_builds(cache)
    if installed is not None and builds.get(library_id(installed), {}).get("key") == key:
        return f"{PACKAGE} {version} for this CPU is installed (build {key})"
    wheels = cache / "wheels" / key
    wheel = next(iter(sorted(wheels.glob("*.whl"))), None) if wheels.is_dir() else None
    did = "installed the kept wheel"
    if wheel is None:
        print(f"Building {PACKAGE} {version} for this CPU (a few minutes, once per machine and flags):\n"
              f"  CMAKE_ARGS=\"{' '.join(args)}\"", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # beside the kept wheels: the move below is a rename
            built = build_wheel(python, version, args, Path(tmp), environ=environ, pip_args=pip_args)
            wheels.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built), wheels / built.name)  # same file system: the kept wheel appears whole
            wheel = wheels / built.name
        did = "built and installed"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-cache-dir", *pip_args,
                    str(wheel)], check=True)
    installed = _installed_dir(python)
    if installed is None:
        raise SystemExit(f"{PACKAGE} did not install into {python}")
    builds[library_id(installed)] = {"key": key, "version": version, "cmake_args": args, "cpu": cpu.model}
    write_json(builds_record(cache), builds)
    return f"{did} {PACKAGE} {version} for this CPU (build {key})"


def rebuild_command(version: str, cpu: Cpu | None = None, *, python: str = "python") -> str:
    """The one command that reinstalls llama-cpp-python for this CPU without the crashing path, for messages."""
    args = cmake_args(cpu or read_cpu(), amx=False)
    return (f"CMAKE_ARGS=\"{' '.join(args)}\" {python} -m pip install --force-reinstall --no-deps --no-cache-dir "
            f"--no-binary {PACKAGE} {PACKAGE}=={version}")


def pinned_version(constraints: Path) -> str | None:
    """The llama-cpp-python version a constraints file pins (`llama-cpp-python==X`), if any."""
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and name.strip().lower().replace("_", "-") == PACKAGE:
            return version.strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpu_build.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cmake-args", help="print llama-cpp-python's CMAKE_ARGS for this CPU (or another one's)")
    c.add_argument("--cpuinfo", type=Path, default=Path("/proc/cpuinfo"),
                   help="a /proc/cpuinfo recorded on the machine the build is for (default: this one)")
    sub.add_parser("cpu", help="print this CPU's model, flags and what the OS enables, as JSON")
    e = sub.add_parser("ensure", help="install llama-cpp-python built for this CPU into a Python environment")
    e.add_argument("--python", default=sys.executable, help="the environment's python (default: this one)")
    e.add_argument("--version", help="llama-cpp-python version (default: the one --constraints pins)")
    e.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    ns = parser.parse_args(argv)
    if ns.command == "cmake-args":
        print(" ".join(cmake_args(read_cpu(ns.cpuinfo), amx=amx_requested(), extra=os.environ.get("CMAKE_ARGS", ""))))
    elif ns.command == "cpu":
        cpu = read_cpu()
        print(json.dumps({"model": cpu.model, "arch": cpu.arch, "flags": sorted(cpu.flags), "os": os_state()}, indent=1))
    else:
        version = ns.version or (pinned_version(ns.constraints) if ns.constraints.exists() else None)
        if not version:
            parser.error(f"say --version, or pin {PACKAGE}==X in {ns.constraints}")
        print(ensure(ns.python, version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
