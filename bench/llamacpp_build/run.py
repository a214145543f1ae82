"""What building llama.cpp for this CPU's listed instruction sets (slmkit's install) costs against `-march=native`,
on the default model's packaged Q4_1 GGUF, one machine, one run:

- llama-bench (C++) tg128 / pp512 built with slmkit's flags (bench/llama_tools.py) and, where it runs, natively;
- `slmkit eval --backend llamacpp --speed` on the same GGUF through the installed llama-cpp-python (slmkit's build);
- the llama.cpp guard's first check (the one-time child process) and a kept verdict's read;
- with --wheel-times: how long llama-cpp-python's wheel takes to build with slmkit's flags, with and without the
  cut of its multimodal library (LLAVA_BUILD=OFF), and installing the kept wheel (what a fresh clone pays).

    .venv/bin/python bench/llamacpp_build/run.py [--wheel-times] [--native-anyway]

Writes bench/results/llamacpp_build.{json,md} with `lscpu`'s model and flags. On a CPU that lists AMX the native
build is skipped (it dies there) unless --native-anyway.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import llama_tools  # noqa: E402

from slmkit import cpu_build  # noqa: E402
from slmkit.engine.llamacpp_guard import describe_exit  # noqa: E402

SLMKIT = [sys.executable, "-m", "slmkit"]


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict:
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": describe_exit(out.returncode, out.stdout, out.stderr)}
    return {("pp512" if r["n_prompt"] else "tg128"): r["avg_ts"] for r in json.loads(out.stdout)}


def slmkit_speed(home: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed.json"
        subprocess.run([*SLMKIT, "eval", "--backend", "llamacpp", "--speed", "--out", str(out)], check=True,
                       env={**os.environ, "SLMKIT_HOME": str(home)}, capture_output=True)
        speed = json.loads(out.read_text())["results"]["speed"]
    return {"tg": speed["decode_tokens_per_s"], "pp": speed["prefill_tokens_per_s"]}


def guard_times() -> dict:
    code = "import time; t = time.monotonic(); from slmkit.engine import llamacpp_guard as g; v = g.check(); print(v.ok, time.monotonic() - t)"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SLMKIT_MACHINE_CACHE": tmp}
        first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
        again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    return {"ok": first[0] == "True", "first_check_s": float(first[1]), "kept_verdict_s": float(again[1])}


def wheel_times() -> dict:
    """Seconds to build llama-cpp-python's wheel with slmkit's flags, with and without the build cut, and to install
    a kept wheel into a fresh environment."""
    version = importlib.metadata.version("llama-cpp-python")
    cpu = cpu_build.read_cpu()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in (("slmkit flags", cpu_build.cmake_args(cpu)),
                            ("slmkit flags, multimodal library built too", [a for a in cpu_build.cmake_args(cpu) if a not in cpu_build.BUILD_CUTS])):
            out = Path(tmp) / label.replace(" ", "_").replace(",", "")
            start = time.monotonic()
            wheel = cpu_build.build_wheel(sys.executable, version, args, out, quiet=True)
            res[label] = {"build_s": time.monotonic() - start, "wheel_mb": wheel.stat().st_size / 1e6}
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheel = next((Path(tmp) / "slmkit_flags").glob("*.whl"))
        start = time.monotonic()
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
        res["install kept wheel"] = {"build_s": time.monotonic() - start}
    return res


# recorded on an AVX2-only machine (Haswell): what the emulated check builds for
HASWELL_CPUINFO = ("processor\t: 0\nmodel name\t: Intel Core Processor (Haswell)\nflags\t\t: fpu vme de pse tsc msr pae mce "
                   "cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm "
                   "constant_tsc rep_good nopl xtopology cpuid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe "
                   "popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 erms invpcid "
                   "xsaveopt arat\n")


def emulated(gguf: Path) -> dict:
    """An AVX2-only CPU under qemu-user (`-cpu Haswell`: AVX2, no AVX-512): the installed build (made for this
    machine) and a build made for the recorded Haswell flags, each through the guard's probe. qemu-user shows the
    host's /proc/cpuinfo, so only running the code tells."""
    from slmkit.engine import llamacpp_guard

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return {"skipped": "qemu-x86_64 not found (apt-get install qemu-user)"}
    launcher = (qemu, "-cpu", "Haswell")
    res: dict = {}
    start = time.monotonic()
    ok, detail = llamacpp_guard.probe(gguf, 2, launcher=launcher)
    res["installed build"] = {"runs": ok, "detail": detail, "seconds": time.monotonic() - start}
    with tempfile.TemporaryDirectory() as tmp:
        info = Path(tmp) / "cpuinfo"
        info.write_text(HASWELL_CPUINFO)
        args = cpu_build.cmake_args(cpu_build.read_cpu(info))
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        start = time.monotonic()
        wheel = cpu_build.build_wheel(py, importlib.metadata.version("llama-cpp-python"), args, Path(tmp) / "wheel", quiet=True)
        subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True)  # with its deps
        built = time.monotonic() - start
        start = time.monotonic()
        ok, detail = llamacpp_guard.probe(gguf, 2, launcher=launcher, python=py)
        res["AVX2 build (recorded Haswell flags)"] = {"runs": ok, "cmake_args": args, "build_s": built, "detail": detail,
                                                      "seconds": time.monotonic() - start}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, default=Path("/tmp/slmkit-bench-home"))
    ap.add_argument("--wheel-times", action="store_true")
    ap.add_argument("--emulate", action="store_true", help="also check an AVX2 build on qemu-user's Haswell")
    ap.add_argument("--native-anyway", action="store_true", help="build and run -march=native even where the CPU lists AMX")
    ns = ap.parse_args()
    os.environ["SLMKIT_HOME"] = str(ns.home)
    from slmkit.sources.packaged import default_gguf

    gguf = default_gguf()[0]
    threads = os.cpu_count() or 2
    cpu = cpu_build.read_cpu()
    r: dict = {"benchmark": "llamacpp_build", "cpu": llama_tools.lscpu(), "threads": threads, "gguf": gguf.name,
               "slmkit_cmake_args": llama_tools.tool_args(), "llama_cpp_python": importlib.metadata.version("llama-cpp-python")}
    subprocess.run([*SLMKIT, "models", "list"], check=True, capture_output=True)  # imports the default model once
    builds = {"slmkit flags": False} | ({"native": True} if not cpu.has_amx or ns.native_anyway else {})
    r["llama_bench"], r["tool_build_s"] = {}, {}
    for label, native in builds.items():
        binaries, seconds = llama_tools.build(["llama-bench"], native=native)
        r["tool_build_s"][label] = seconds or None
        r["llama_bench"][label] = llama_bench(binaries / "llama-bench", gguf, threads)
        print(label, r["llama_bench"][label], flush=True)
    r["slmkit_eval_speed"] = slmkit_speed(ns.home)
    print("slmkit eval --backend llamacpp --speed", r["slmkit_eval_speed"], flush=True)
    r["guard"] = guard_times()
    if ns.emulate:
        r["emulated_haswell"] = emulated(gguf)
        print("emulated Haswell", r["emulated_haswell"], flush=True)
    if ns.wheel_times:
        r["wheel"] = wheel_times()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamacpp_build.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / "llamacpp_build.md").write_text(report(r))
    print(report(r))


def report(r: dict) -> str:
    lb, sp = r["llama_bench"], r["slmkit_eval_speed"]
    safe = lb["slmkit flags"]
    md = ["# llama.cpp built for this CPU's listed instruction sets vs -march=native", "",
          f"CPU: {r['cpu']['model']}, {r['cpu']['cpus']} CPUs, flags {' '.join(r['cpu']['flags'])}; {r['threads']} threads; "
          f"{r['gguf']} (the default model's packaged file); llama-cpp-python {r['llama_cpp_python']}.", "",
          f"slmkit's flags: `{' '.join(r['slmkit_cmake_args'])}`", "",
          "| build | tg128 tok/s | pp512 tok/s | tg vs slmkit flags | pp vs slmkit flags |", "|---|---|---|---|---|"]
    for label, v in lb.items():
        if "error" in v:
            md.append(f"| llama-bench, {label} | {v['error']} | | | |")
            continue
        md.append(f"| llama-bench, {label} | {v['tg128']:.1f} | {v['pp512']:.1f} | {v['tg128'] / safe['tg128']:.3f} | {v['pp512'] / safe['pp512']:.3f} |")
    md.append(f"| slmkit eval --backend llamacpp --speed (installed wheel, slmkit flags; 256-token prompt, 64 new) | "
              f"{sp['tg']:.1f} | {sp['pp']:.1f} | {sp['tg'] / safe['tg128']:.3f} | {sp['pp'] / safe['pp512']:.3f} |")
    g = r["guard"]
    md += ["", f"The guard's first check on this build and CPU (a child process loads the GGUF, prefills a multi-token "
               f"prompt, decodes 4 tokens): {g['first_check_s']:.2f} s, verdict {'runs' if g['ok'] else 'dies'}; "
               f"with the verdict kept: {g['kept_verdict_s']:.2f} s (both include importing slmkit's engine, torch included). "
               f"slmkit's `eval --speed` decode goes through Python and slmkit's sampler for every token (llama-bench "
               f"samples nothing), after a 256-token prompt."]
    builds = {k: v for k, v in r["tool_build_s"].items() if v}
    if builds:
        md += ["", "llama-bench build times (cmake, all cores): " + "; ".join(f"{k} {v:.0f} s" for k, v in builds.items())]
    if "emulated_haswell" in r and "skipped" not in r["emulated_haswell"]:
        md += ["", "## An AVX2-only CPU, emulated (qemu-user `-cpu Haswell`; its /proc/cpuinfo still shows the host's flags)", "",
               "| build | runs the guard's probe | what happened | seconds under emulation |", "|---|---|---|---|"]
        for label, v in r["emulated_haswell"].items():
            md.append(f"| {label} | {'yes' if v['runs'] else 'no'} | {v['detail']} | {v['seconds']:.1f} |")
    if "wheel" in r:
        md += ["", "## What `make install` pays for llama.cpp", "", "| step | seconds | wheel MB |", "|---|---|---|"]
        for label, v in r["wheel"].items():
            md.append(f"| {label} | {v['build_s']:.0f} | {v['wheel_mb']:.1f} |" if "wheel_mb" in v else f"| {label} | {v['build_s']:.0f} | - |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
