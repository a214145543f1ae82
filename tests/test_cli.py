"""Every CLI command through typer's test runner, including the bad-input paths."""

from __future__ import annotations

import json

import pytest
from conftest import snapshot
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.cli.generate import ChatSession
from slmkit.store import Store

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_models_list_show_rm(store):
    r = invoke("models", "list")
    assert r.exit_code == 0, r.output
    assert "smollm2-135m-instruct *" in r.stdout and "tiny" in r.stdout
    r = invoke("models", "show", "tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "tiny"
    r = invoke("models", "show", "tiny")
    assert r.exit_code == 0 and "LlamaForCausalLM" in r.stdout and "model.safetensors" in r.stdout
    r = invoke("models", "rm", "tiny")
    assert r.exit_code == 0 and "deleted tiny" in r.stdout
    assert Store().names() == ["smollm2-135m-instruct"]


def test_models_import_and_errors(store, tiny_dir, tmp_path):
    r = invoke("models", "import", str(tiny_dir), "--name", "again")
    assert r.exit_code == 0, r.output
    assert "imported again" in r.stdout and Store().exists("again")
    before = snapshot(store.root)
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    cases = [
        (["models", "import", str(tiny_dir), "--name", "../x"], "invalid model name"),
        (["models", "import", str(tiny_dir), "--name", "again"], "already exists"),
        (["models", "import", str(bad)], "not a GGUF file"),
        (["models", "import", str(tmp_path / "missing")], "does not exist"),
        (["models", "rm", "tiny", "nosuch"], "no model named 'nosuch'"),
        (["models", "show", "nosuch"], "Models available"),
    ]
    for args, message in cases:
        r = invoke(*args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
        assert snapshot(store.root) == before, args


def test_run_default_and_named(store):
    r = invoke("run", "--seed", "3", "--max-tokens", "8", "hello there")
    assert r.exit_code == 0, r.output
    again = invoke("run", "--seed", "3", "--max-tokens", "8", "hello there")
    assert again.stdout == r.stdout and r.stdout.endswith("\n")
    r = invoke("run", "tiny", "--raw", "--temperature", "0", "-n", "5", "-v", "The quick")
    assert r.exit_code == 0 and "generated" in r.stderr and "tokens/s" in r.stderr


def test_run_reads_prompt_from_stdin(store):
    r = invoke("run", "tiny", "-n", "4", "--seed", "1", input="The quick brown\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == invoke("run", "tiny", "-n", "4", "--seed", "1", "The quick brown\n").stdout


def test_run_errors(store):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 30
    for args, message in [
        (["run", "nosuch", "hi"], "no model named 'nosuch'"),
        (["run", "tiny", long_prompt], "context window is 64 tokens"),
        (["run", "tiny", "--top-p", "2", "hi"], "top_p"),
        (["run", "a", "b", "c"], "expected [MODEL] PROMPT"),
        (["run", "--backend", "gpu", "hi"], "unknown backend"),
    ]:
        r = invoke(*args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)


def test_chat_commands(store):
    script = "hello\n/system Be brief.\n/system\n/reset\nsecond\n/unknown\n/bye\n"
    r = invoke("chat", "tiny", "--seed", "0", "-n", "4", input=script)
    assert r.exit_code == 0, r.output
    assert "System prompt set." in r.stderr and "System prompt: Be brief." in r.stderr
    assert "Conversation cleared." in r.stderr and "Unknown command /unknown" in r.stderr
    assert r.stdout.count(">>> ") == 7


def test_chat_history_reset_and_ctrl_c(store):
    import slmkit

    model = slmkit.load("tiny")
    session = ChatSession(model, system="sys", sampling={"max_tokens": 3, "seed": 0})
    session.handle("one")
    session.handle("two")
    roles = [m["role"] for m in session.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant"]

    real = model.stream_chat

    def interrupted(messages, **kw):
        gen = real(messages, **kw)
        original = gen._pieces

        def pieces():
            yield "partial"
            original.close()
            raise KeyboardInterrupt

        gen._pieces = pieces()
        return gen

    model.stream_chat = interrupted
    assert session.handle("three") is True  # Ctrl-C stops the answer, not the session
    assert session.history[-1] == {"role": "assistant", "content": "partial"}
    model.stream_chat = real
    session.handle("/reset")
    assert session.messages() == [{"role": "system", "content": "sys"}]
    assert session.handle("/exit") is False


def test_chat_drops_oldest_turns_to_fit_context(store):
    import slmkit

    session = ChatSession(slmkit.load("tiny"), system=None, sampling={"max_tokens": 2, "seed": 0})
    for i in range(8):
        session.handle(f"message number {i} about the fox")
    assert session.history[-2]["content"] == "message number 7 about the fox"
    assert len(session.history) < 16


def test_chat_refuses_base_model(home, tiny_base_dir):
    from slmkit.sources.importer import import_path

    import_path(tiny_base_dir, "base")
    r = invoke("chat", "base", input="hi\n")
    assert r.exit_code == 1 and "--raw" in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["models", "--help"], ["run", "--help"], ["chat", "--help"]])
def test_help(args):
    r = invoke(*args)
    assert r.exit_code == 0 and "Usage" in r.stdout


def test_version_json_list_and_wide_pipes(store, tiny_dir):
    import subprocess
    import sys

    from slmkit.version import __version__

    for flag in ("--version", "-V"):
        r = runner.invoke(app, [flag])
        assert r.exit_code == 0 and r.output.strip() == f"slmkit {__version__}"
    r = runner.invoke(app, ["models", "list", "--json"])
    cards = json.loads(r.output)
    assert r.exit_code == 0 and {c["name"] for c in cards} >= {"tiny"} and all("parameters" in c for c in cards)
    # piped to another program, the table is not cut to 80 columns: a long name stays whole on its row
    long = "a-model-with-a-rather-long-name-that-would-not-fit-an-eighty-column-terminal-table-x"
    assert runner.invoke(app, ["models", "import", str(tiny_dir), "--name", long]).exit_code == 0
    out = subprocess.run([sys.executable, "-m", "slmkit", "models", "list"], capture_output=True, text=True, check=True).stdout
    assert any(long in line and "tiny" not in line.split(long)[0] for line in out.splitlines()), out


def test_stage_commands_print_their_result_as_json(store, tmp_path):
    """--json on the commands that make something: the new model's card (what an export wrote), parseable, with the
    summary lines left out."""
    rows = tmp_path / "rows.txt"
    rows.write_text("\n\n".join(f"the quick brown fox jumps over the lazy dog {i}" for i in range(40)))
    runs = [(["quantize", "tiny", "--scheme", "int8", "--no-ppl", "--name", "q"], "q"),
            (["prune", "tiny", "--method", "magnitude", "--sparsity", "0.5", "--no-ppl", "--name", "p"], "p"),
            (["finetune", "tiny", "--data", str(rows), "--method", "full", "--steps", "2", "--seq-len", "16", "--name", "f"], "f")]
    for args, name in runs:
        r = runner.invoke(app, [*args, "--json"])
        assert r.exit_code == 0, r.output
        card = json.loads(r.stdout)
        assert card["name"] == name and card["parent"] == "tiny" and "made " not in r.stdout
    r = runner.invoke(app, ["export", "tiny", "--type", "F16", "--no-ppl", "--out", str(tmp_path / "x"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gguf"].endswith(".gguf")


def test_data_commands_and_import_print_json(store, tiny_dir, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "".join(f"row number {i},{'ab'[i % 2]}\n" for i in range(20)))
    r = runner.invoke(app, ["data", "split", str(rows), "--out", str(tmp_path / "s"), "--text-column", "text",
                            "--label-column", "label", "--folds", "2", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["labels"] == 2 and [s["heldout"] for s in got["splits"]] == [10, 10] and got["splits"][0]["folder"].endswith("fold-1")
    r = runner.invoke(app, ["data", "list", "--json"])
    listed = {d["name"]: d for d in json.loads(r.stdout)}
    assert r.exit_code == 0 and listed["wikitext2"]["found"] == "packaged" and listed["wikitext2"]["rows"] > 0
    r = runner.invoke(app, ["models", "import", str(tiny_dir), "--name", "imported", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "imported"
