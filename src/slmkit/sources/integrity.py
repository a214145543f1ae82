"""Is a stored model whole? Cheap checks on every load (the files the card lists are there; each safetensors file is
as long as its own header says; each weight format's files add up to the bytes the card recorded), and `slmkit models
verify`'s full check (every file's SHA-256 against the card). A damaged folder gets a clear error naming the file,
never a reader's traceback halfway through loading."""

from __future__ import annotations

from pathlib import Path

from slmkit.card import CARD_JSON, CARD_MD, ModelCard, sha256_file
from slmkit.errors import BrokenModel
from slmkit.sources.hf_dir import safetensors_problem


def problems(folder: Path, card: ModelCard) -> list[str]:
    """What is wrong with a stored model's files, cheaply (stat calls and safetensors headers; no hashing, and no
    GGUF reader: gguf-py parses a 49k-token vocabulary in seconds): listed files missing, weights truncated or grown."""
    out, named = [], set()
    for name in card.files:
        path = folder / name
        if not path.is_file():
            out.append(f"{name} is missing")
            named.add(name)
        elif path.suffix == ".safetensors" and (why := safetensors_problem(path)):
            out.append(f"{name}: {why}")
            named.add(name)
    for fmt, expected in card.weights_bytes.items():  # the card's bytes per weight format (build_card)
        files = [n for n in card.files if n.endswith(f".{fmt}")]
        if not files or named & set(files):  # a file of this format is already named above
            continue
        actual = sum((folder / n).stat().st_size for n in files)
        if actual != expected:
            how = f"it is truncated: {actual:,} bytes" if actual < expected else f"it has {actual:,} bytes"
            out.append(f"{', '.join(files)}: {how} where the card says {expected:,}")
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
