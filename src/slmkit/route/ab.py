"""A/B split: one served name that sends a configured share of the traffic to each of its arms, sticky per user
key (the same key always lands on the same arm), so a new student can be tried on 10% of traffic. Pure."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from slmkit.errors import SlmkitError


@dataclass(frozen=True)
class Split:
    name: str
    arms: tuple[str, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.arms) < 2 or len(self.arms) != len(self.shares):
            raise SlmkitError(f"A/B split {self.name!r} needs at least two arms, each with a share", "For example --ab new=smollm2:0.9,student:0.1.")
        if len(set(self.arms)) != len(self.arms):
            raise SlmkitError(f"A/B split {self.name!r} names an arm twice", "Give each model once.")
        if any(s < 0 for s in self.shares) or abs(sum(self.shares) - 1) > 1e-6:
            raise SlmkitError(f"A/B split {self.name!r}: the shares {list(self.shares)} must be >= 0 and sum to 1 (they sum to {sum(self.shares):g})",
                              "Fix the shares, for example 0.9 and 0.1.")

    def arm(self, key: str | None) -> str:
        """The arm for a user key (a random one when there is no key: not sticky)."""
        key = key if key else uuid.uuid4().hex
        u = int.from_bytes(hashlib.sha256(f"{self.name}\0{key}".encode()).digest()[:8], "big") / 2**64  # uniform in [0, 1)
        acc = 0.0
        for arm, share in zip(self.arms, self.shares):
            acc += share
            if u < acc:
                return arm
        return self.arms[-1]


def parse_split(text: str) -> Split:
    """NAME=MODEL:SHARE,MODEL:SHARE[,...]"""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SlmkitError(f"cannot read the A/B split {text!r}", "Write NAME=MODEL:SHARE,MODEL:SHARE, for example ab=smollm2:0.9,student:0.1.")
    arms: list[str] = []
    shares: list[float] = []
    for part in rest.split(","):
        model, colon, share = part.rpartition(":")
        try:
            shares.append(float(share))
        except ValueError:
            raise SlmkitError(f"A/B split {name!r}: {part!r} has no numeric share", "Write MODEL:SHARE, for example student:0.1.") from None
        if not colon or not model:
            raise SlmkitError(f"A/B split {name!r}: {part!r} names no model", "Write MODEL:SHARE.")
        arms.append(model)
    return Split(name, tuple(arms), tuple(shares))

