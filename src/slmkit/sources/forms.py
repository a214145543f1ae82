"""What a store folder holds, asked in one place (the start of it: the architecture step moves every form here).

A router: router.json (a small and a large model with a policy, made by `slmkit route calibrate`) beside a
config.json that other loaders refuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROUTER_FILE = "router.json"
ROUTER_CONFIG = {"architectures": ["SlmkitRouter"], "model_type": "slmkit-router",
                 "note": "a slmkit router (router.json), not model weights: serve it with `slmkit serve NAME`"}


def is_router(folder: Path) -> bool:
    return (Path(folder) / ROUTER_FILE).is_file()


def read_router(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / ROUTER_FILE).read_text())
