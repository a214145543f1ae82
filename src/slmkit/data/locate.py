"""Where evaluation data comes from. For a dataset named in the catalog, in this order:

1. a data folder the caller names (`--data-dir`), else `SLMKIT_DATA`: the catalog's layout inside it;
2. slmkit's cache (`SLMKIT_HOME/data`, same layout), each file checked against the hash written beside it;
3. the compact copy shipped inside slmkit (WikiText-2 test, ARC-Easy and ARC-Challenge test), unpacked into the cache
   and checked against the catalog's hash; these are the full splits, so they come before the network;
4. the Hugging Face Hub through the `datasets` library, unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set,
   written into the cache.
An explicit file path never comes here: callers use it as it is. Nothing is left half-written: every file is
written to a temporary name and renamed into place, its hash beside it.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.card import sha256_file as sha256_of
from slmkit.config import settings
from slmkit.data.catalog import DataFile, Dataset, get_dataset
from slmkit.errors import SlmkitError

PACKAGED = Path(__file__).parent / "packaged"
STALE_TMP_SECONDS = 3600


class DataNotFound(SlmkitError):
    pass


@dataclass(frozen=True)
class Where:
    """Where one file of a dataset is (or would be) found, and from which source."""

    path: Path | None
    origin: str  # "data folder", "cache", "packaged", "hub", or "missing"
    note: str = ""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _sweep_stale(folder: Path) -> None:
    """Temporary files a killed writer left behind (older than an hour, so a live writer's are kept)."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                p.unlink()
        except OSError:
            pass


def _install(tmp: Path, target: Path) -> Path:
    """Rename a finished temporary file into the cache with its hash beside it (hash first, then the data)."""
    digest = sha256_of(tmp)
    side_tmp = _tmp_beside(_sidecar(target))
    side_tmp.write_text(digest + "\n")
    os.replace(side_tmp, _sidecar(target))
    os.replace(tmp, target)
    return target


def _cached(target: Path) -> tuple[bool, str]:
    """(usable, why not): a cache file is usable when its hash matches the one written beside it."""
    if not target.is_file():
        return False, "not in the cache"
    side = _sidecar(target)
    if not side.is_file():
        return False, f"{target} has no hash file beside it (not written by slmkit, or cut short)"
    if sha256_of(target) != side.read_text().strip():
        return False, f"{target} does not match its hash (truncated or corrupt)"
    return True, ""


def _discard(target: Path) -> None:
    for p in (target, _sidecar(target)):
        p.unlink(missing_ok=True)


def _unpack(f: DataFile, target: Path) -> Path:
    """The packaged copy of `f`, unpacked into the cache and checked against the catalog's hash."""
    source = PACKAGED / (f.path + ".xz")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(target)
    try:
        with lzma.open(source) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        if sha256_of(tmp) != f.sha256:
            raise SlmkitError(f"the packaged copy {source} is damaged (hash mismatch)", "Reinstall slmkit.")
        return _install(tmp, target)
    except (OSError, lzma.LZMAError) as exc:
        raise SlmkitError(f"cannot unpack {source}: {exc}", "Reinstall slmkit, or check that SLMKIT_HOME is writable.") from exc
    finally:
        tmp.unlink(missing_ok=True)


def hub_rows(ds: Dataset, split: str) -> Iterable[dict[str, Any]]:
    """The rows of one split from the Hugging Face Hub (the `datasets` library; its own cache applies)."""
    import datasets

    return datasets.load_dataset(ds.hub, ds.hub_config, split=split)


def _write_rows(ds: Dataset, rows: Iterable[dict[str, Any]], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(target)
    try:
        n = 0
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(row[ds.text_field] if ds.text_field else json.dumps(dict(row), ensure_ascii=False) + "\n")
                n += 1
        if n == 0:
            raise SlmkitError(f"the Hub returned no rows for {ds.name}", f"Check the dataset {ds.hub} on the Hub.")
        return _install(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _from_hub(ds: Dataset, f: DataFile, target: Path) -> Path:
    with progress.step(f"fetching {ds.name} ({f.split}) from the Hugging Face Hub ({ds.hub})"):
        return _write_rows(ds, hub_rows(ds, f.split), target)


def _data_folder(data_dir: Path | None) -> Path | None:
    folder = data_dir or settings().data_dir
    if folder is not None and not folder.is_dir():
        raise DataNotFound(f"the data folder {folder} does not exist",
                           "Give a folder laid out as `slmkit data list` shows (--data-dir or SLMKIT_DATA), or leave it out.")
    return folder


def locate(name: str, split: str | None = None, *, data_dir: Path | None = None, hub: bool = True) -> Path:
    """The path of dataset `name`'s `split` file, found or filled in the order this module describes."""
    ds = get_dataset(name)
    f = ds.file(split)
    folder = _data_folder(data_dir)
    if folder is not None:
        if (folder / f.path).is_file():
            return folder / f.path
        progress.note(f"{folder / f.path} not found in the data folder; looking in slmkit's cache")
    cache = settings().data_cache
    target = cache / f.path
    _sweep_stale(target.parent)
    ok, why_not = _cached(target)
    if ok:
        return target
    if target.exists():
        progress.note(f"{why_not}; getting it again")
        _discard(target)
    if f.sha256:
        return _unpack(f, target)
    reason = "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set"
    if ds.hub is None:
        reason = "not on the Hub"
    elif hub and not settings().hub_offline:
        try:
            return _from_hub(ds, f, target)
        except SlmkitError:
            raise
        except Exception as exc:  # the datasets library raises many kinds when offline or when the Hub says no
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'}"
    elif not hub:
        reason = "not asked"
    looked = ([f"{folder / f.path} (data folder)"] if folder else []) + [f"{target} (cache)"]
    raise DataNotFound(
        f"dataset {name!r} ({f.split} split) is not on this machine; looked for {', '.join(looked)}; "
        f"the Hugging Face Hub ({ds.hub}): {reason}",
        f"Online: `slmkit data fetch {name}`. Offline: put the file at DATA/{f.path} (rows in the Hub's schema, one JSON "
        f"object a line) and pass --data-dir DATA or set SLMKIT_DATA, or `slmkit data fetch {name} --from DATA`.",
    )


def where(name: str, *, data_dir: Path | None = None) -> list[Where]:
    """Where each file of `name` would come from now, without fetching or unpacking anything."""
    ds = get_dataset(name)
    folder = data_dir or settings().data_dir
    out = []
    for f in ds.files:
        target = settings().data_cache / f.path
        if folder is not None and (folder / f.path).is_file():
            out.append(Where(folder / f.path, "data folder"))
        elif _cached(target)[0]:
            out.append(Where(target, "cache"))
        elif f.sha256:
            out.append(Where(PACKAGED / (f.path + ".xz"), "packaged"))
        else:
            note = "" if not target.exists() else _cached(target)[1]
            out.append(Where(None, "missing", note))
    return out


def fetch(name: str, *, source: Path | None = None, force: bool = False) -> list[Path]:
    """Fill the cache with every split of `name`: from a folder in the catalog's layout (`source`), the packaged
    copy, or the Hub. `force` replaces what the cache holds."""
    ds = get_dataset(name)
    paths = []
    for f in ds.files:
        target = settings().data_cache / f.path
        if force:
            _discard(target)
        elif _cached(target)[0]:
            paths.append(target)
            continue
        _discard(target)
        if source is not None:
            given = source / f.path
            if not given.is_file():
                raise DataNotFound(f"{given} not found", f"The folder must hold {name}'s files as {', '.join(x.path for x in ds.files)}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_beside(target)
            try:
                shutil.copyfile(given, tmp)
                paths.append(_install(tmp, target))
            finally:
                tmp.unlink(missing_ok=True)
        elif f.sha256:
            paths.append(_unpack(f, target))
        elif settings().hub_offline:
            raise DataNotFound(f"cannot fetch {name}: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set",
                               f"Unset it, or copy the files from a folder: slmkit data fetch {name} --from DATA")
        else:
            try:
                paths.append(_from_hub(ds, f, target))
            except SlmkitError:
                raise
            except Exception as exc:  # the datasets library raises many kinds when offline or when the Hub says no
                raise DataNotFound(f"cannot fetch {name} ({f.split}) from the Hugging Face Hub ({ds.hub}): "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                                   f"Check the network, or copy the files from a folder: slmkit data fetch {name} --from DATA") from exc
    return paths
