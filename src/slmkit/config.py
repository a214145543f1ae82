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

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def settings() -> Settings:
    """Read the environment: SLMKIT_HOME (store root) and SLMKIT_THREADS (CPU threads for inference)."""
    home = Path(os.environ.get("SLMKIT_HOME") or Path.home() / ".cache" / "slmkit").expanduser()
    raw_threads = os.environ.get("SLMKIT_THREADS", "")
    threads = int(raw_threads) if raw_threads.isdigit() and int(raw_threads) > 0 else (os.cpu_count() or 1)
    return Settings(home=home, threads=threads)
