"""Every environment setting slmkit reads, in one typed place (no os.environ elsewhere)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Settings:
    """Settings resolved from the environment at call time (tests change them with monkeypatch)."""

    home: Path
    threads: int
    data_dir: Path | None

    @property
    def evals_dir(self) -> Path:
        return self.home / "evals"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def settings() -> Settings:
    """Read the environment: SLMKIT_HOME (store root) and SLMKIT_THREADS (CPU threads for inference)."""
    home = Path(os.environ.get("SLMKIT_HOME") or Path.home() / ".cache" / "slmkit").expanduser()
    raw_threads = os.environ.get("SLMKIT_THREADS", "")
    threads = int(raw_threads) if raw_threads.isdigit() and int(raw_threads) > 0 else (os.cpu_count() or 1)
    return Settings(home=home, threads=threads, data_dir=_data_dir())


def _data_dir() -> Path | None:
    """SLMKIT_DATA, else the shared data folder beside the checkout (../shared/data) if there is one."""
    if os.environ.get("SLMKIT_DATA"):
        return Path(os.environ["SLMKIT_DATA"]).expanduser()
    repo = Path(__file__).resolve().parents[2]  # src/slmkit/config.py -> the checkout
    for candidate in (Path.cwd() / ".." / "shared" / "data", repo / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None
