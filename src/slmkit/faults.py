"""Named points where a test kills the process outright (SIGKILL: no cleanup, no exception), so the kill -9 tests
hit every phase of a command whatever the machine's speed: `SLMKIT_KILL_AT=PHASE` (config.settings().kill_at).

Phases: loading (a model or file is being read), computing (the work is done or under way, nothing written yet),
writing (a staging folder or checkpoint holds files, not yet complete), renaming (between the renames that install).
"""

from __future__ import annotations

import os
import signal

from slmkit.config import settings

PHASES = ("loading", "computing", "writing", "renaming")


def point(phase: str) -> None:
    """Die here if the environment names this phase (a test hook; nothing happens otherwise)."""
    if settings().kill_at == phase:
        os.kill(os.getpid(), signal.SIGKILL)
