"""Vocabulary: the chapter's order and size on the real corpus, JSON round trip, min_freq."""

from __future__ import annotations

from pathlib import Path

from benchmarks.chapter_loop import chapter_tokens
from rnnlm.vocab import UNK, Vocab


def test_time_machine_vocabulary(corpus_path: Path, tmp_path: Path) -> None:
    vocab = Vocab.build(chapter_tokens(corpus_path))
    assert len(vocab) == 28
    assert vocab.idx_to_token[:11] == [UNK, " ", "e", "t", "a", "i", "n", "o", "s", "h", "r"]
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab


def test_frequency_order_ties_keep_first_seen_order_and_min_freq_cuts() -> None:
    vocab = Vocab.build(list("abcabcbdde"), min_freq=2)
    # b:3, then a, c, d with 2 each in first-seen order; e (1) is cut.
    assert vocab.idx_to_token == [UNK, "b", "a", "c", "d"]
    assert vocab.encode("bez") == [1, 0, 0]  # unknown characters map to <unk> = 0
    assert vocab.unknown("Bez b") == ["B", "e", "z", " "]


def test_reserved_tokens_follow_unk() -> None:
    assert Vocab.build("aab", reserved_tokens=["<pad>"]).idx_to_token == [UNK, "<pad>", "a", "b"]
