"""Incremental detokenization and stop strings."""

from __future__ import annotations

from conftest import build_tokenizer

from slmkit.engine.text_stream import IncrementalDecoder, StopMatcher


def test_incremental_decoding_round_trips_unicode():
    tok = build_tokenizer()
    text = "héllo wörld, ça va? 東京 😀 — new words: zebra quixotic."
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(lambda x: tok.decode(x))
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never emits half a character


def test_stop_string_split_across_pieces():
    m = StopMatcher(["<END>"])
    out = [m.push(p) for p in ["Hello <", "EN", "D> more"]]
    assert "".join(out) == "Hello " and m.stopped
    assert m.flush() == ""


def test_held_back_text_is_released_when_no_stop_follows():
    m = StopMatcher(["\n\n", "User:"])
    shown = m.push("Answer\n") + m.push("Use") + m.push("ful.")
    assert shown == "Answer\nUseful." and not m.stopped
    m2 = StopMatcher(["User:"])
    assert m2.push("say Us") == "say " and m2.flush() == "Us"


def test_earliest_stop_wins_and_no_stops_pass_through():
    m = StopMatcher(["b", "a"])
    assert m.push("xxaxb") == "xx"
    assert StopMatcher([]).push("anything") == "anything"
