"""The local model store: one folder per model under SLMKIT_HOME/models, installed atomically.

A model is written into a hidden staging folder (`.staging-<name>-<pid>-<rand>`) and renamed into place only
when complete, so an import that fails, is interrupted, or is killed never leaves a half model under its name.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from collections.abc import Callable
from typing import Any

from slmkit import faults, progress
from slmkit.card import CARD_JSON, ModelCard, build_card, read_card, write_card
from slmkit.config import settings
from slmkit.errors import BrokenModel, InvalidName, ModelNotFound, SlmkitError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


def validate_name(name: str) -> str:
    """Accept only plain folder names: no separators, no leading dot, so no traversal or absolute paths."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(
            f"invalid model name {name!r}",
            "Use 1-100 characters from letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(no '/', no '..', no absolute paths); for example: my-model-int8.",
        )
    return name


def name_from_path(path: Path) -> str:
    """Derive a valid store name from a file or folder name (lower case, invalid characters as '-')."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower()
    return cleaned[:100] or "model"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """Models on disk: list, read cards, remove, and install atomically."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else settings().models_dir

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / CARD_JSON).is_file()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.match(p.name) and (p / CARD_JSON).is_file())

    def scan(self) -> tuple[list[ModelCard], dict[str, str]]:
        """Every model's card, and the folders whose card cannot be read (name -> why): one broken folder never hides
        the others."""
        cards, broken = [], {}
        for n in self.names():
            try:
                cards.append(read_card(self.root / n))
            except BrokenModel as exc:
                broken[n] = exc.message
        return cards, broken

    def cards(self) -> list[ModelCard]:
        return self.scan()[0]

    def card(self, name: str) -> ModelCard:
        self.require(name)
        return read_card(self.path(name))

    def require(self, name: str) -> Path:
        """The folder of an installed model, or an error that lists what exists."""
        folder = self.path(name)
        if not (folder / CARD_JSON).is_file():
            have = self.names()
            listing = ", ".join(have) if have else "(the store is empty)"
            raise ModelNotFound(
                f"no model named {name!r} in the store ({self.root})",
                f"Models available: {listing}. Import one with: slmkit models import PATH --name {name}",
            )
        return folder

    def annotate(self, name: str, key: str, value: Any) -> ModelCard:
        """Add `key` to an installed model's card settings (what made it, for a recipe); the files are unchanged."""
        card = self.card(name)
        card.settings[key] = value
        write_card(self.path(name), card)
        return card

    def remove(self, name: str) -> None:
        """Delete a model: rename it out of sight first, so a crash mid-delete leaves no broken model listed."""
        folder = self.require(name)
        trash = self.root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> list[Path]:
        """Remove staging folders left by killed processes (their pid is gone) and leftover trash."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for p in self.root.iterdir():
            if p.name.startswith(TRASH_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.name.startswith(STAGING_PREFIX):
                m = re.search(r"-(\d+)-[0-9a-f]{8}$", p.name)
                if m and not pid_alive(int(m.group(1))):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def sweep_exports(self) -> list[Path]:
        """Remove the temporary files (`.NAME.tmp-PID`) a killed export left under SLMKIT_HOME/exports."""
        exports = self.root.parent / "exports"
        removed: list[Path] = []
        if not exports.is_dir():
            return removed
        for p in exports.rglob(".*.tmp-*"):
            m = re.search(r"\.tmp-(\d+)$", p.name)
            if m and not pid_alive(int(m.group(1))):
                if p.is_dir():  # `export --type auto`'s trial folder
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def check_free(self, name: str, *, overwrite: bool = False) -> None:
        """Fail before slow work starts if `name` is taken and the caller did not ask to replace it."""
        if self.path(name).exists() and not overwrite:
            raise SlmkitError(
                f"a model named {name!r} already exists",
                f"Pick another name with --name, or replace it with --force (or: slmkit models rm {name}).",
            )

    def derive(
        self, name: str, write: Callable[[Path], None], *, stage: str, parent: str | None = None,
        source: dict[str, Any] | None = None, settings: dict[str, Any] | None = None, parameters: int | None = None,
        overwrite: bool = False,
    ) -> ModelCard:
        """Install model `name` made by `stage`: `write(staging)` puts its files in a staging folder, then its card
        (lineage: parent, stage, settings; file hashes, size, parameters) is written and the folder renamed into
        place. Every stage and import ends here; a failure anywhere leaves nothing under `name`."""
        faults.point("computing")
        with self.install(name, overwrite=overwrite) as staging:
            write(staging)
            faults.point("writing")
            with progress.step("Hashing files and writing the model card"):
                card = build_card(staging, name=name, stage=stage, parent=parent,
                                  source=source if source is not None else {"kind": "stage", "parent": parent},
                                  settings=settings, parameters=parameters)
                write_card(staging, card)
        return card

    @contextmanager
    def install(self, name: str, *, overwrite: bool = False) -> Iterator[Path]:
        """Yield an empty staging folder; on clean exit it becomes model `name`, on any exception it is deleted.

        The caller writes weights, tokenizer and card into the folder. KeyboardInterrupt counts as failure.
        """
        target = self.path(name)
        self.check_free(name, overwrite=overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()
        staging = self.root / f"{STAGING_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
            if not (staging / CARD_JSON).is_file():
                raise SlmkitError(f"internal error: install of {name!r} wrote no {CARD_JSON}")
            faults.point("renaming")
            if overwrite and target.exists():
                trash = self.root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                os.rename(target, trash)
                os.rename(staging, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                try:  # renaming onto an existing model folder fails: of two writers of one name, the first wins
                    os.rename(staging, target)
                except OSError as exc:
                    raise SlmkitError(f"a model named {name!r} was installed by another command while this one ran",
                                      f"Nothing was replaced. Pick another --name, or replace it with --force (or: slmkit models rm {name}).") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
