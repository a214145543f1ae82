"""A model from the Hugging Face Hub through huggingface_hub (its cache, resume, token, HF_ENDPOINT and
HF_HUB_OFFLINE): a GGUF repo's file for one quant type, or a safetensors repo's weights and tokenizer.

`hf.co/ORG/REPO:Q4_K_M` is Ollama's spelling and means the same here: the repo's GGUF file whose name carries the
quant type (case does not matter); without one, Q4_K_M where there is one, or the repo's only GGUF file. A GGUF
file's SHA-256 is checked against the one the Hub lists for it (its LFS pointer)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit.card import sha256_file
from slmkit.config import settings
from slmkit.errors import ImportFailed

HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "hf://")
DEFAULT_QUANT = "Q4_K_M"  # Ollama's choice for a GGUF repo named without a quant type
# what a safetensors repo's pull fetches: the config, weights and tokenizer files (never pickles)
HF_DIR_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]


@dataclass(frozen=True)
class HfRef:
    repo: str
    quant: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf.co/{self.repo}" + (f"@{self.revision}" if self.revision else "") + (f":{self.quant}" if self.quant else "")


def is_hf(text: str) -> bool:
    return text.startswith(HF_PREFIXES)


def parse_ref(text: str) -> HfRef:
    for p in HF_PREFIXES:
        if text.startswith(p):
            text = text[len(p):]
            break
    rest, _, quant = text.partition(":")
    repo, _, revision = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ImportFailed(f"{text!r} is not a Hugging Face repo", "Spell it hf.co/ORG/REPO[:QUANT], for example "
                           "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M.")
    return HfRef(repo, quant or None, revision or None)


def pick_gguf(files: list[str], quant: str | None) -> str:
    """The GGUF file of `files` for quant type `quant` (see the module's note)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    whole = [f for f in ggufs if "-of-0" not in f.lower()]  # split files (-00001-of-00003) are not read
    want = (quant or DEFAULT_QUANT).lower()
    matches = [f for f in whole if want in Path(f).name.lower()]
    if len(matches) == 1 or (matches and quant):
        return min(matches, key=len)
    if quant is None and len(whole) == 1:
        return whole[0]
    kinds = ", ".join(Path(f).name for f in whole) or "(none whole; split GGUF files are not read)"
    raise ImportFailed(f"no single GGUF file for {quant or 'a default quant type'} among: {kinds}",
                       "Name one after the repo, as Ollama does: hf.co/ORG/REPO:QUANT (for example :Q8_0).")


def fetch(ref: HfRef, report: Any) -> tuple[Path, dict[str, Any]]:
    """Download `ref` (or find it in huggingface_hub's cache when offline): the local GGUF file or folder, and the
    source to record in the card."""
    import httpx
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    source: dict[str, Any] = {"kind": "huggingface", "repo": ref.repo}
    try:
        if settings().hub_offline:  # only what huggingface_hub has cached
            folder = Path(snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
            files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
            if any(f.lower().endswith(".gguf") for f in files):
                pick = pick_gguf(files, ref.quant)
                return folder / pick, {**source, "file": pick, "offline": True}
            return folder, {**source, "offline": True}
        report({"status": "pulling manifest"})
        info = HfApi(endpoint=endpoint).model_info(ref.repo, revision=ref.revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        source["revision"] = info.sha
        if any(f.lower().endswith(".gguf") for f in siblings):
            pick = pick_gguf(list(siblings), ref.quant)
            lfs = siblings[pick].lfs
            report({"status": f"pulling {pick}", "total": siblings[pick].size})
            # by the name asked for (not the commit), so that huggingface_hub's cache finds it again offline
            path = Path(hf_hub_download(ref.repo, pick, revision=ref.revision, endpoint=endpoint))
            want = lfs.sha256 if lfs is not None else None
            if want:
                report({"status": "verifying sha256 digest"})
                got = sha256_file(path)
                if got != want:
                    raise ImportFailed(f"{pick} from {ref.repo} does not match the SHA-256 the Hub lists "
                                       f"({got[:12]} != {want[:12]})", "Delete it from huggingface_hub's cache "
                                       "(`hf cache delete`) and pull again.")
            return path, {**source, "file": pick, "sha256": want}
        if not any(f.endswith(".safetensors") for f in siblings):
            raise ImportFailed(f"{ref.repo} has neither GGUF nor safetensors files",
                               "Pick a repo with *.gguf files or a transformers model saved as safetensors.")
        report({"status": f"pulling {ref.repo} (safetensors)"})
        folder = Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=HF_DIR_FILES, endpoint=endpoint))
        return folder, source
    except LocalEntryNotFoundError as exc:
        raise ImportFailed(f"{ref} is not in huggingface_hub's cache and HF_HUB_OFFLINE is set",
                           "Pull it once while online (unset HF_HUB_OFFLINE), or give a local file or folder.") from exc
    except HfHubHTTPError as exc:
        raise ImportFailed(f"the Hugging Face Hub refused {ref}: {str(exc).splitlines()[0]}",
                           "Check the repo's name (and HF_TOKEN for a gated or private repo).") from exc
    except (OSError, httpx.HTTPError) as exc:
        raise ImportFailed(f"could not reach the Hugging Face Hub for {ref}: {exc}",
                           "Check the network (or HF_ENDPOINT); an interrupted download resumes when you pull again.") from exc
