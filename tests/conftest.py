"""Fixtures: a tiny random Llama model with a tokenizer trained in the test, and a private store per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Small language models run on laptops, offline and private.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "héllo wörld, ça va? 東京 😀 — unicode bytes must round-trip.",
    "def add(a, b):\n    return a + b\n",
] * 20

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens, trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_llama(
    folder: Path, *, chat_template: str | None = CHATML, context: int = 64, seed: int = 0, vocab_size: int = 320,
    layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 64,
) -> Path:
    """Save a 2-layer random Llama (hidden 32, GQA 4/2 heads) and its tokenizer as safetensors in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=context, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights give a peaked, varied next-token distribution
        for p in model.parameters():
            p.normal_(0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


FAMILIES = ["qwen2", "qwen3", "mistral", "phi3", "gemma3_text"]  # beside Llama: the other layouts engine/families.py runs


def build_family_model(folder, family: str, window: int | None = None, **overrides):
    """A tiny random model of another family (Qwen2: biases on q/k/v; Qwen3: q/k head norms; Mistral: Llama's blocks;
    Phi-3: fused layers; Gemma 3: four norms per block scaling by 1 + weight, GeGLU, scaled embeddings, local and
    global layers with their own rope bases), with the tiny tokenizer, saved as safetensors. `window`: a sliding
    attention window short enough to cut what a token sees (Gemma 3: on all but the last layer); `overrides`: more
    config fields."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3 if window else 2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sliding = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
    cfg = {"qwen2": lambda: Qwen2Config(**common, **sliding), "qwen3": lambda: Qwen3Config(**common, head_dim=8),
           "mistral": lambda: MistralConfig(**common, sliding_window=window),
           "phi3": lambda: Phi3Config(**common, sliding_window=window),
           "gemma3_text": lambda: Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=12, sliding_window=window or 4096,
                                                   layer_types=["sliding_attention"] * (common["num_hidden_layers"] - 1) + ["full_attention"],
                                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                                                    "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})}[family]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(1)
    net = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    net.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """The same kind of model without a chat template: a base model."""
    return build_tiny_llama(tmp_path_factory.mktemp("tinybase") / "tiny-base", chat_template=None)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty, private SLMKIT_HOME for one test."""
    h = tmp_path / "slmkit-home"
    monkeypatch.setenv("SLMKIT_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def _tiny_store_template(tmp_path_factory, tiny_dir) -> Path:
    from slmkit.config import DEFAULT_MODEL
    from slmkit.sources.importer import import_path
    from slmkit.store import Store

    root = tmp_path_factory.mktemp("store-template") / "models"
    store = Store(root)
    import_path(tiny_dir, "tiny", store=store)
    # stands in for the default so commands that name no model run fast (the slow tests use the real one)
    import_path(tiny_dir, DEFAULT_MODEL, store=store)
    return root


@pytest.fixture
def store(home, _tiny_store_template):
    """A private store holding the tiny model as 'tiny' and under the default model's name."""
    from slmkit.store import Store

    shutil.copytree(_tiny_store_template, home / "models")
    return Store()


def snapshot(root: Path) -> list[str]:
    """Every path under root, to assert a failed command changed nothing."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Small language models run on laptops, offline and private. "
              "Paris is the capital of France. Berlin is the capital of Germany. def add(a, b): return a + b\n") * 40


@pytest.fixture
def calib(tmp_path) -> Path:
    """A calibration text file for the stages that look at activations."""
    path = tmp_path / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture
def wide(store, tmp_path_factory) -> str:
    """A 4-block tiny Llama in the store as 'wide': 4 heads in 2 KV groups, a 64-channel MLP."""
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path_factory.mktemp("wide") / "wide", layers=4, intermediate=64), "wide")
    return "wide"


# --- leaving the test process ---------------------------------------------------------------------------------
# Once every test has run and pytest has written its report, the process ends with pytest's own exit status and
# without the interpreter's final teardown: with the servers' daemon threads and llama.cpp, torch and OpenMP runtimes
# loaded, that teardown (C++ static destructors, under ggml's terminate handler) once aborted a run whose tests had
# all passed ("terminate called without an active exception" in Py_FinalizeEx). Nothing a test checks runs there.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    import os
    import sys

    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


@pytest.fixture(autouse=True)
def _thawed_heap():
    """A served model freezes the heap (serve/registry.settled); give the collector everything back after each test,
    so what earlier tests left in cycles is still collected."""
    yield
    import gc

    gc.unfreeze()
