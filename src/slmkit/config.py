"""Every environment setting slmkit reads, in one typed place (no os.environ elsewhere)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from slmkit.cpu_build import machine_cache
from slmkit.errors import SlmkitError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Settings:
    """Settings resolved from the environment at call time (tests change them with monkeypatch)."""

    home: Path
    threads: int
    data_dir: Path | None  # SLMKIT_DATA: a folder of evaluation data the user keeps (slmkit.data.catalog's layout)
    hub_offline: bool  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: never try the Hugging Face Hub for data
    native: bool  # SLMKIT_NATIVE (0 turns off slmkit's own CPU kernels, slmkit/native)
    cxx: str  # CXX: the compiler that builds them
    kernel_dir: Path  # TORCH_EXTENSIONS_DIR/slmkit: where they are built
    machine_cache: Path  # SLMKIT_MACHINE_CACHE: this machine's llama.cpp wheels and the llama.cpp guard's verdicts
    llamacpp_guard: bool  # SLMKIT_LLAMACPP_GUARD (0: trust the llama.cpp build without a child-process check)
    kill_at: str  # SLMKIT_KILL_AT: a test hook, the phase at which the process kills itself (slmkit.faults)

    @property
    def evals_dir(self) -> Path:
        return self.home / "evals"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def kernel_choices_file(self) -> Path:
        """The W8A8 kernel choices timed on this machine (layers.integer.use_kernel_cache)."""
        return self.home / "cache" / "w8a8-kernels.json"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def data_cache(self) -> Path:
        """Evaluation data slmkit fetched or unpacked, in the same layout as a data folder."""
        return self.home / "data"


def settings() -> Settings:
    """Read the environment: SLMKIT_HOME (store root), SLMKIT_THREADS (CPU threads for inference), SLMKIT_DATA
    (a data folder; slmkit never looks for one on its own), the Hugging Face offline switches, and what slmkit's CPU
    kernels are built with (SLMKIT_NATIVE, CXX, TORCH_EXTENSIONS_DIR: torch's own setting for built extensions), and
    what belongs to the machine rather than a store (SLMKIT_MACHINE_CACHE, SLMKIT_LLAMACPP_GUARD)."""
    home = Path(os.environ.get("SLMKIT_HOME") or Path.home() / ".cache" / "slmkit").expanduser()
    if home.exists() and not home.is_dir():
        raise SlmkitError(f"SLMKIT_HOME={home} is a file, not a folder", "Point SLMKIT_HOME at a folder (it is created if missing).")
    raw_threads = os.environ.get("SLMKIT_THREADS", "")
    threads = int(raw_threads) if raw_threads.isdigit() and int(raw_threads) > 0 else (os.cpu_count() or 1)
    data = os.environ.get("SLMKIT_DATA")
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions").expanduser()
    return Settings(home=home, threads=threads, data_dir=Path(data).expanduser() if data else None, hub_offline=offline,
                    native=os.environ.get("SLMKIT_NATIVE", "1") != "0", cxx=os.environ.get("CXX") or "c++",
                    kernel_dir=extensions / "slmkit", machine_cache=machine_cache(os.environ),
                    llamacpp_guard=os.environ.get("SLMKIT_LLAMACPP_GUARD", "1") != "0",
                    kill_at=os.environ.get("SLMKIT_KILL_AT", ""))
