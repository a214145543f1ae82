"""`slmkit mix`: a mixture of specialists by total probability (engine/mixture_ops.py), installed as a store model
that names its specialists; loading opens each and mixes them (engine/mixture.py). The specialists must share one
tokenizer (a mixture sums distributions over the same tokens): typically LoRA or full fine-tunes of one base on
separate domains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slmkit.card import ModelCard
from slmkit.errors import SlmkitError
from slmkit.sources.forms import MIXTURE_CONFIG, MIXTURE_FILE, form_of
from slmkit.sources.hf_dir import load_tokenizer
from slmkit.store import Store, validate_name

SHARE = 0.02  # of the weight returned to the prior after every token: a conversation can change domain


def _vocab_key(folder: Path) -> str:
    """What two specialists must agree on: their vocabulary (token -> id) and special tokens."""
    tok = load_tokenizer(folder)
    return hashlib.sha256(json.dumps([sorted(tok.get_vocab().items()), tok.all_special_tokens]).encode()).hexdigest()


def mix_stage(specialists: list[str], *, name: str, prior: list[float] | None = None, share: float = SHARE,
              store: Store | None = None) -> ModelCard:
    """Install `name`: `specialists` (store models sharing a tokenizer) mixed with `prior` weights (default equal)
    and `share` of the weight returned to the prior after each token (0: exact Bayes, the domain never changes)."""
    store = store or Store()
    name = validate_name(name)
    store.check_free(name)
    if len(specialists) < 2 or len(set(specialists)) != len(specialists):
        raise SlmkitError("a mixture needs two or more different specialists", "For example: slmkit mix stories-lora support-lora --name mixed")
    if prior is not None and (len(prior) != len(specialists) or any(p <= 0 for p in prior)):
        raise SlmkitError(f"--prior needs {len(specialists)} positive weights, one per specialist, got {prior}", "For example --prior 0.5,0.3,0.2.")
    if not 0 <= share < 1:
        raise SlmkitError(f"--share must be in [0, 1), got {share}", "0 is exact Bayes; 0.01 to 0.05 lets a conversation change domain.")
    keys = {}
    for s in specialists:
        form = form_of(store.require(s))
        if form in ("router", "mixture", "prompt-tuned"):
            raise SlmkitError(f"{s} is a {form}, not a model a mixture can hold",
                              "Mix models that predict tokens themselves (float, integer, low-rank or LoRA children).")
        keys[s] = _vocab_key(store.require(s))
    if len(set(keys.values())) > 1:
        raise SlmkitError(f"the specialists have different tokenizers: {', '.join(keys)}",
                          "Mix models made from one base (slmkit finetune, prune, quantize of the same model).")
    weights = [p / sum(prior) for p in prior] if prior else [1 / len(specialists)] * len(specialists)
    mixture = {"format": 1, "specialists": list(specialists), "prior": weights, "share": share}

    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(MIXTURE_CONFIG, indent=2) + "\n")
        (folder / MIXTURE_FILE).write_text(json.dumps(mixture, indent=2) + "\n")

    params = sum(store.card(s).parameters or 0 for s in specialists)
    return store.derive(name, write, stage="mix", parent=specialists[0], parameters=params or None,
                        settings={**mixture, "specialists_files": {s: store.card(s).files for s in specialists}})
