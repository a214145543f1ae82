"""llama.cpp's C++ tools (llama-bench, llama-server, llama-perplexity, ...) for side-by-side benchmarks, built from
the sources the installed llama-cpp-python vendors, outside the package, with the same CPU flags slmkit's install
uses (src/slmkit/cpu_build.py: this CPU's instruction sets, no ggml AMX path unless SLMKIT_LLAMA_AMX=1), or with
`--native` (`-march=native`, llama.cpp's own default, which dies on some AMX CPUs).

    .venv/bin/python bench/llama_tools.py --targets llama-bench llama-server     # prints the folder of the binaries

Builds are kept per flags under --work (default /tmp/slmkit-llama-tools/KEY), so a second call returns at once.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import cpu_build  # noqa: E402

WORK = Path("/tmp/slmkit-llama-tools")


def sources(work: Path = WORK) -> Path:
    """The llama.cpp sources vendored by the installed llama-cpp-python version (its sdist, from PyPI)."""
    version = importlib.metadata.version("llama-cpp-python")
    folder = work / f"llama_cpp_python-{version}"
    if not (folder / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(work)], check=True, capture_output=True)
        with tarfile.open(next(work.glob(f"llama_cpp_python-{version}.tar.gz"))) as tar:
            tar.extractall(work, filter="data")
    return folder / "vendor" / "llama.cpp"


def lscpu() -> dict:
    """The CPU as benchmark results record it: model, CPU count, the vector-ISA flags."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = lambda k: next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(k)), "")  # noqa: E731
    return {"model": field("Model name"), "cpus": field("CPU(s)"),
            "flags": [f for f in field("Flags").split() if re.match(r"avx|amx|fma|f16c|vnni|bmi2", f)]}


def tool_args(native: bool = False) -> list[str]:
    """The CMake arguments for the tools: llama-cpp-python's install flags for this CPU (without its own options), or
    llama.cpp's native default."""
    if native:
        return ["-DGGML_NATIVE=ON"]
    args = cpu_build.cmake_args(cpu_build.read_cpu(), amx=cpu_build.amx_requested())
    return [a for a in args if a not in cpu_build.BUILD_CUTS]


def build(targets: list[str], *, native: bool = False, work: Path = WORK) -> tuple[Path, float]:
    """Build `targets`; (the folder of the binaries, seconds the build took: 0 when already built)."""
    src = sources(work)
    args = ["-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", *tool_args(native)]
    out = work / f"build-{cpu_build.build_key(src.parent.name, args)}"
    binaries = out / "bin"
    if all((binaries / t).exists() for t in targets):
        return binaries, 0.0
    start = time.monotonic()
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *args], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(out), "-j", "--target", *targets], check=True, capture_output=True)
    return binaries, time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="+", default=["llama-bench", "llama-server"])
    ap.add_argument("--native", action="store_true", help="-march=native (llama.cpp's default) instead of slmkit's flags")
    ap.add_argument("--work", type=Path, default=WORK)
    ns = ap.parse_args()
    binaries, seconds = build(ns.targets, native=ns.native, work=ns.work)
    print(binaries)
    if seconds:
        print(f"built in {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
