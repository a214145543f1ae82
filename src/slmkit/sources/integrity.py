"""Is a stored model whole? Cheap checks on every load (files the card lists are present; each safetensors and GGUF
file is as long as its own header says), and `slmkit models verify`'s full check (every file's SHA-256 against the
card). A damaged folder gets a clear error naming the file, never a reader's traceback halfway through loading."""

from __future__ import annotations

from pathlib import Path

from slmkit.card import CARD_JSON, CARD_MD, ModelCard, sha256_file
from slmkit.errors import BrokenModel, ImportFailed
from slmkit.sources.gguf import check_gguf
from slmkit.sources.hf_dir import safetensors_problem

def gguf_problem(path: Path) -> str | None:
    try:
        check_gguf(path)
    except ImportFailed as exc:
        return exc.message.replace(str(path), "it")
    return None


CHECKS = {".safetensors": safetensors_problem, ".gguf": gguf_problem}


def problems(folder: Path, card: ModelCard) -> list[str]:
    """What is wrong with a stored model's files, cheaply (no hashing): listed files missing, weights truncated."""
    out = []
    for name in card.files:
        path = folder / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif (check := CHECKS.get(path.suffix)) and (why := check(path)):
            out.append(f"{name}: {why}")
    return out


def require_whole(folder: Path, card: ModelCard) -> None:
    """Refuse to load a model whose files are damaged, naming them."""
    found = problems(folder, card)
    if found:
        raise BrokenModel(f"model {card.name} is damaged: {'; '.join(found)}",
                          f"Check it with `slmkit models verify {card.name}`; remove it (`slmkit models rm {card.name}`) "
                          f"and make it again (its card says how: `slmkit models show {card.name}`).")


def verify(folder: Path, card: ModelCard) -> dict[str, str]:
    """Every file the card lists, hashed: file -> "ok", "missing" or "changed"; files the card does not list are
    reported as "not in the card"."""
    out = {}
    for name, digest in card.files.items():
        path = folder / name
        out[name] = "missing" if not path.is_file() else "ok" if sha256_file(path) == digest else "changed"
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in card.files and path.name not in (CARD_JSON, CARD_MD):
            out[path.name] = "not in the card"
    return out
