"""Does this llama.cpp build run on this CPU? Asked of a child process, never of the user's.

A llama.cpp built for instructions the CPU lacks, or with a path that crashes on it (ggml's AMX path on some Xeons),
dies with SIGILL at the first multi-token prompt and takes the whole process with it: no Python exception to catch.
So the first time a given build (a digest of llama-cpp-python's compiled libraries) runs on a given CPU, a child
process loads the packaged default GGUF, prefills a multi-token prompt (the batched matrix kernels, where a
one-token prompt never reaches) and decodes a few tokens. The verdict is kept per build and CPU in the machine cache
(`llamacpp-guard.json`), so later runs pay nothing. `SLMKIT_LLAMACPP_GUARD=0` skips the check.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slmkit import cpu_build
from slmkit.config import settings
from slmkit.errors import SlmkitError
from slmkit.sources.packaged import default_gguf

GUARD_FILE = "llamacpp-guard.json"
TIMEOUT_S = 300
# the child: load, prefill ~60 tokens in one batch, decode 4 greedily; prints "ok" only if all of that ran
PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_batch=128, n_threads=int(sys.argv[2]), verbose=False)
text = b"A small language model runs on the machine you have: it reads a prompt of many tokens in one batch, " \\
       b"then writes its answer one token at a time, and every matrix kernel of this build is used on the way."
ids = llm.tokenize(text)
assert len(ids) > 16, len(ids)
llm.eval(ids)
for _ in range(4):
    llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
print("ok", flush=True)
"""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str  # what happened: "decoded a 40-token prompt", "killed by SIGILL (illegal instruction)", ...
    build: str  # library_id of the llama-cpp-python that was checked ('' when none is installed)
    cpu: str
    version: str = ""
    checked_at: float = 0.0
    seconds: float = 0.0


def package_dir() -> Path | None:
    """Where llama-cpp-python is installed (found without importing it: importing loads its libraries)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return ""


def rebuild_hint() -> str:
    """The one command that rebuilds llama.cpp for this CPU without ggml's AMX path (in a checkout: make install)."""
    return ("Rebuild llama.cpp for this CPU: `make install` in an slmkit checkout, or\n  "
            + cpu_build.rebuild_command(version() or "VERSION", python=sys.executable))


def describe_exit(rc: int, out: str, err: str) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        what = {"SIGILL": "illegal instruction: built for instructions this CPU does not run",
                "SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGABRT": "aborted"}.get(name, "")
        return f"killed by {name}" + (f" ({what})" if what else "")
    last = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1]
    return f"exited with code {rc}" + (f": {last[:300]}" if last else "")


def probe(gguf: Path, threads: int, script: str | None = None, launcher: tuple[str, ...] = (),
          python: str = sys.executable) -> tuple[bool, str]:
    """Run `script` (default PROBE) in a child `python` (default this one) with the GGUF and thread count, under
    `launcher` if given (an emulator: `qemu-x86_64 -cpu Haswell`); (it printed ok, what happened)."""
    try:
        done = subprocess.run([*launcher, python, "-c", script or PROBE, str(gguf), str(threads)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"did not finish a short prompt in {TIMEOUT_S} s"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return True, "loaded the packaged GGUF, prefilled a multi-token prompt and decoded 4 tokens"
    return False, describe_exit(done.returncode, done.stdout, done.stderr)


def cached(build: str | None = None) -> Verdict | None:
    """The kept verdict for the installed build on this CPU (None when it was never checked)."""
    directory = package_dir()
    if directory is None:
        return None
    build = build or cpu_build.library_id(directory)
    entry = cpu_build.read_json(settings().machine_cache / GUARD_FILE).get(f"{build}|{cpu_build.cpu_id()}")
    return Verdict(**entry) if entry else None


@functools.cache
def check() -> Verdict:
    """This process's verdict on the installed llama.cpp (asked of a child once per build and CPU, then read back)."""
    directory = package_dir()
    cpu = cpu_build.cpu_id()
    if directory is None:
        return Verdict(False, "llama-cpp-python is not installed", "", cpu)
    config = settings()
    build = cpu_build.library_id(directory)
    if not config.llamacpp_guard:
        return Verdict(True, "not checked (SLMKIT_LLAMACPP_GUARD=0)", build, cpu, version())
    kept = cached(build)
    if kept is not None:
        return kept
    gguf, _ = default_gguf()
    start = time.monotonic()
    ok, detail = probe(gguf, config.threads)
    verdict = Verdict(ok, detail, build, cpu, version(), time.time(), round(time.monotonic() - start, 2))
    path = config.machine_cache / GUARD_FILE
    cpu_build.write_json(path, {**cpu_build.read_json(path), f"{build}|{cpu}": asdict(verdict)})
    return verdict


def require() -> None:
    """Raise a clear error, before anything loads in this process, when llama.cpp cannot run here."""
    verdict = check()
    if not verdict.ok:
        raise SlmkitError(f"llama.cpp (llama-cpp-python {verdict.version or '?'}) does not run on this CPU: {verdict.detail}",
                          rebuild_hint() + "\nOr use the PyTorch engine: --backend torch")
