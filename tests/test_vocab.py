"""Vocabulary trimming (`slmkit prune --vocab`): the corpus encodes to the same tokens renumbered, any other text still
encodes and decodes back, the child's logits are the parent's at the kept tokens, and llama.cpp reads the child."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_family_model
from typer.testing import CliRunner

import slmkit
from slmkit.cli import app
from slmkit.compress.vocab_stage import vocab_stage
from slmkit.engine.torch_backend import TorchBackend
from slmkit.errors import SlmkitError
from slmkit.sources.importer import import_path
from slmkit.store import Store

runner = CliRunner()
DOMAIN = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
          "Small language models run on laptops, offline and private."] * 5
OUTSIDE = "Zebras quietly vexed 42 jumping wizards; héllo 😀 ÆØÅ"


def byte_fallback_tokenizer():
    """A SentencePiece-style BPE (spaces as ▁, byte-fallback pieces <0xNN>, Gemma's layout) trained on a small text."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<unused0>", "<unused1>"]
                                  + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text("\n\n".join(DOMAIN))
    return path


def _check_child(parent: str, child: str, corpus_texts: list[str], exact: bool = True) -> list[int]:
    """The child's tokenizer and logits against the parent's; returns the kept old ids (new id = position)."""
    store = Store()
    p, c = TorchBackend.from_folder(store.path(parent)), TorchBackend.from_folder(store.path(child))
    old_vocab = json.loads((store.path(parent) / "tokenizer.json").read_text())["model"]["vocab"]
    new_vocab = json.loads((store.path(child) / "tokenizer.json").read_text())["model"]["vocab"]
    kept = [old_vocab[t] for t, _ in sorted(new_vocab.items(), key=lambda kv: kv[1])]
    assert c.vocab_size == len(kept) < p.vocab_size
    for text in corpus_texts:
        ids = p.encode(text)
        if exact:
            assert c.encode(text) == [kept.index(i) for i in ids]
        assert c.tokenizer.decode(c.encode(text)) == p.tokenizer.decode(ids)
    outside = c.encode(OUTSIDE)  # text outside the kept tokens still encodes, into more pieces, and decodes back
    assert c.tokenizer.decode(outside) == p.tokenizer.decode(p.encode(OUTSIDE)) and len(outside) >= len(p.encode(OUTSIDE))
    text = corpus_texts[0]
    with torch.inference_mode():
        got = c.model(input_ids=torch.tensor([c.encode(text)])).logits[0, -1]
        if exact:  # the same model at the kept tokens
            want = p.model(input_ids=torch.tensor([p.encode(text)])).logits[0, -1, kept]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        lean = c.fast.forward(c.fast.new_cache(1), torch.tensor([c.encode(text)]))[0]
        torch.testing.assert_close(lean, got, atol=1e-4, rtol=1e-4)
    return kept


def test_trimming_keeps_the_corpus_tokens_and_the_model_at_them(store, corpus):
    card = vocab_stage("tiny", [corpus], name="base-domain")
    assert card.stage == "prune" and card.parent == "tiny" and card.settings["kind"] == "vocabulary"
    assert card.settings["dropped"] > 0 and card.settings["kept"] + card.settings["dropped"] == card.settings["vocab_before"]
    kept = _check_child("tiny", "base-domain", DOMAIN)
    assert card.settings["kept"] == len(kept)
    chat = slmkit.load("base-domain", backend="torch").chat([{"role": "user", "content": "Paris?"}], max_tokens=4, temperature=0)
    assert isinstance(chat, str)  # ChatML's specials were kept: the chat template renders and runs


def test_a_byte_fallback_vocabulary_trims_to_the_corpus(store, tmp_path, corpus):
    """Gemma's layout: a SentencePiece-style BPE with byte-fallback pieces; unused special tokens go, the bytes stay."""
    folder = build_family_model(tmp_path / "g", "gemma3_text", query_pre_attn_scalar=16)
    tok = byte_fallback_tokenizer()
    tok.chat_template = "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"
    tok.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(vocab_size=len(tok), bos_token_id=2, eos_token_id=1, pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file  # the embedding resized to the new vocabulary

    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    torch.manual_seed(0)
    weights[key] = torch.randn(len(tok), weights[key].shape[1]) * 0.3
    save_file(weights, str(folder / "model.safetensors"))
    import_path(folder, "gem")
    card = vocab_stage("gem", [corpus], name="gem-domain")
    kept = _check_child("gem", "gem-domain", DOMAIN)
    new_vocab = json.loads((Store().path("gem-domain") / "tokenizer.json").read_text())["model"]["vocab"]
    assert "<unused0>" not in new_vocab and all(f"<0x{i:02X}>" in new_vocab for i in range(256)) and "<bos>" in new_vocab
    assert card.settings["kept"] == len(kept)

    from slmkit.export.store_export import export_model

    with pytest.raises(SlmkitError, match="pre-tokenizer"):  # no GGUF in its lineage to take llama.cpp's vocabulary from
        export_model("gem-domain", "F32", out_dir=tmp_path / "out")


def test_keep_n_and_the_cli(store, corpus):
    r = runner.invoke(app, ["prune", "tiny", "--vocab", str(corpus), "--keep", "10", "--name", "tiny-top", "--no-ppl"])
    assert r.exit_code == 0, r.output
    assert "tokens kept of" in r.output
    card = Store().card("tiny-top")
    assert card.settings["keep"] == 10
    _check_child("tiny", "tiny-top", DOMAIN, exact=False)  # fewer tokens: the corpus takes more, and still round-trips
    r = runner.invoke(app, ["prune", "tiny", "--keep", "10"])
    assert r.exit_code == 1 and "--keep applies to --vocab" in r.output
    before = sorted(p.name for p in Store().root.iterdir())
    r = runner.invoke(app, ["prune", "tiny", "--vocab", str(corpus.parent / "missing.txt")])
    assert r.exit_code == 1 and "not found" in r.output
    assert sorted(p.name for p in Store().root.iterdir()) == before
    with pytest.raises(SlmkitError, match="positive count"):
        vocab_stage("tiny", [corpus], keep=0)
