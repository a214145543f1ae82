"""slmkit: make small language models and run them on the machine you have, offline."""

from __future__ import annotations

from slmkit.engine.sampling import SamplingParams  # noqa: E402
from slmkit.errors import SlmkitError  # noqa: E402
from slmkit.loading import BACKENDS, load  # noqa: E402
from slmkit.model import Generation, Model, Score  # noqa: E402
from slmkit.store import Store  # noqa: E402
from slmkit.version import __version__  # noqa: E402

__all__ = ["BACKENDS", "Generation", "Model", "SamplingParams", "Score", "SlmkitError", "Store", "__version__", "load"]
