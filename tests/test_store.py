"""The model store: names, atomic installs, cards with lineage, imports and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot

from slmkit.card import sha256_file
from slmkit.errors import ImportFailed, InvalidName, ModelNotFound, SlmkitError
from slmkit.sources.importer import import_path
from slmkit.store import STAGING_PREFIX, Store, name_from_path, validate_name


@pytest.mark.parametrize("bad", ["../x", "..", "/etc/passwd", "a/b", ".hidden", "", "a\\b", "x" * 101, "name with space"])
def test_invalid_names_are_refused(bad):
    with pytest.raises(InvalidName) as e:
        validate_name(bad)
    assert "letters, digits" in e.value.hint


@pytest.mark.parametrize("good", ["smollm2-135m-instruct", "My_Model.v2", "a", "q4_k_m"])
def test_valid_names(good):
    assert validate_name(good) == good


def test_name_from_path():
    assert name_from_path(Path("/x/SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct.q4_1"
    assert name_from_path(Path("/x/my model (copy)")) == "my-model-copy"


def test_import_hf_dir_writes_card_with_lineage(home, tiny_dir):
    card = import_path(tiny_dir, "t1")
    folder = Store().path("t1")
    on_disk = json.loads((folder / "card.json").read_text())
    assert on_disk["name"] == "t1" and on_disk["stage"] == "import" and on_disk["parent"] is None
    assert on_disk["source"]["kind"] == "hf_dir" and on_disk["source"]["path"] == str(tiny_dir.resolve())
    assert card.architecture == "LlamaForCausalLM" and card.context_length == 64
    # every file is hashed, and the hashes are right
    assert "model.safetensors" in card.files and "tokenizer.json" in card.files
    for name, digest in card.files.items():
        assert sha256_file(folder / name) == digest
    assert card.size_bytes == sum((folder / n).stat().st_size for n in card.files)
    # parameter count equals the model's own count (tied embeddings counted once)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert card.parameters == sum(p.numel() for p in model.parameters())
    import yaml

    _, header, body = (folder / "card.md").read_text().split("---\n", 2)
    assert body.lstrip().startswith("# t1")
    front = yaml.safe_load(header)  # the Hugging Face model-card header
    assert front["pipeline_tag"] == "text-generation" and front["tags"] == ["slmkit", "import"] and "base_model" not in front


def test_failed_import_leaves_nothing(home, tiny_dir, monkeypatch):
    import_path(tiny_dir, "keep")
    before = snapshot(home)

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr("slmkit.store.build_card", boom)  # fails after the weights are written (Store.derive)
    with pytest.raises(RuntimeError):
        import_path(tiny_dir, "broken")
    assert snapshot(home) == before
    assert Store().names() == ["keep"]


def test_interrupted_import_leaves_nothing(home, tiny_dir, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("slmkit.store.write_card", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        import_path(tiny_dir, "half")
    assert not Store().exists("half")
    assert not any(p.name.startswith(STAGING_PREFIX) for p in (home / "models").iterdir())


def test_killed_import_is_invisible_and_swept(home, tiny_dir):
    """A process killed mid-install (SIGKILL: no cleanup runs) leaves only a hidden staging folder."""
    code = (
        "import os, sys\n"
        "from slmkit.store import Store\n"
        "with Store().install('victim') as d:\n"
        "    (d / 'model.safetensors').write_bytes(b'half')\n"
        "    os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy())
    assert proc.returncode == 9
    store = Store()
    leftovers = [p for p in store.root.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert len(leftovers) == 1
    assert store.names() == [] and not store.exists("victim")
    with pytest.raises(ModelNotFound):
        store.require("victim")
    import_path(tiny_dir, "next")  # the next install sweeps what the dead process left
    assert not leftovers[0].exists()
    assert store.names() == ["next"]


def test_existing_name_needs_force_and_force_replaces(home, tiny_dir):
    first = import_path(tiny_dir, "m")
    with pytest.raises(SlmkitError, match="already exists"):
        import_path(tiny_dir, "m")
    second = import_path(tiny_dir, "m", overwrite=True)
    assert second.created >= first.created and Store().names() == ["m"]


def test_remove(home, tiny_dir):
    import_path(tiny_dir, "a")
    import_path(tiny_dir, "b")
    Store().remove("a")
    assert Store().names() == ["b"]
    with pytest.raises(ModelNotFound) as e:
        Store().remove("a")
    assert "b" in e.value.hint


def test_unknown_model_lists_what_exists(home, tiny_dir):
    import_path(tiny_dir, "present")
    with pytest.raises(ModelNotFound) as e:
        Store().require("absent")
    assert "present" in e.value.hint


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.write_text("not a model"), "not a GGUF file"),
        (lambda p: p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8), "GGUF"),
    ],
)
def test_bad_files_are_refused(home, tmp_path, setup, message):
    bad = tmp_path / "bad.gguf"
    setup(bad)
    with pytest.raises(ImportFailed, match=message):
        import_path(bad, "bad")
    assert snapshot(home) == []


def test_truncated_gguf_is_refused(home, tmp_path):
    from slmkit.sources.packaged import default_gguf

    real, _ = default_gguf()
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as src:
        cut.write_bytes(src.read(20_000_000))  # header and part of the tensors only
    with pytest.raises(ImportFailed, match="truncated|readable"):
        import_path(cut, "cut")
    assert snapshot(home) == []


def test_folder_without_weights(home, tmp_path, tiny_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ImportFailed, match="no \\*.safetensors.*never unpickles"):
        import_path(folder, "nw")
    assert not Store().exists("nw")


def test_folder_without_config_or_tokenizer(home, tmp_path, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImportFailed, match="config.json"):
        import_path(empty, "e")
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny_dir / f).read_bytes())
    with pytest.raises(ImportFailed, match="no tokenizer"):
        import_path(no_tok, "nt")
    assert snapshot(home) == []
