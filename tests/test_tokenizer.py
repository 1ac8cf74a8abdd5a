"""The tokenizer: exact round trips (unseen characters included), streaming decode, byte counts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx_tinylm  # noqa: F401  (sets up BLAS before anything imports mlx.core)
from mlx_tinylm.errors import TinyLMError
from mlx_tinylm.tokenizer import (
    MIN_VOCAB_SIZE,
    StreamingDecoder,
    Tokenizer,
    train_tokenizer,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinystories"
UNSEEN = [
    "Crème brûlée at the café, naïve Zoë 🎉🐉 said: ¿qué?",
    "数学 and ひらがな and 한국어 — “quotes” … ½ ∑",
    "a literal \u2581 space marker\u2581\u2581 and \u2581 again",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\nand a NUL \x00 and \x7f",
    "<|endoftext|> is just text inside a document, as is <unk>",
    "e\u0301 (combining accent) vs é, \ufeff BOM, \u200b zero width, \U0010ffff",
]


def stories(n: int) -> list[str]:
    text = (DATA / "train.txt").read_text(encoding="utf-8")
    docs = [d.strip("\n") for d in re.split(r"(?m)^<\|endoftext\|>$\n?", text)]
    return [d for d in docs if d.strip()][:n]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stories(200)


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(docs, 512, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_round_trip_every_document_of_the_slice(tok, docs):
    encoded = tok.encode_batch(docs)
    assert [tok.decode(ids) for ids in encoded] == docs
    assert encoded == [tok.encode(d) for d in docs]


@pytest.mark.parametrize("text", UNSEEN)
def test_round_trip_of_characters_never_seen_in_training(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.sp.unk_id() not in ids  # byte fallback: never <unk>


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_of_arbitrary_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes_not_unk(tok):
    ids = tok.encode("🐉")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x90>", "<0x89>"]


def test_end_of_document_token_decodes_to_nothing(tok):
    assert tok.eos_id == 1 and tok.id_to_piece(tok.eos_id) == "<|endoftext|>"
    assert tok.decode(tok.encode("a b") + [tok.eos_id] + tok.encode(" c")) == "a b c"
    assert tok.eos_id not in tok.encode("<|endoftext|>")


def test_token_bytes_sum_to_utf8_length(tok, docs):
    counts = tok.token_bytes()
    assert counts[tok.eos_id] == 0
    for text in docs[:50] + UNSEEN:
        assert counts[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_training_is_deterministic(docs, tmp_path):
    a = train_tokenizer(docs, 400, tmp_path / "a.model")
    b = train_tokenizer(docs, 400, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode(docs[0]) == b.encode(docs[0])


def test_training_sample_is_bounded(docs, tmp_path):
    # Trained on the first 20 stories only, the merges must differ from training on all 200.
    first = sum(len(d.encode()) for d in docs[:20])
    small = train_tokenizer(docs, 450, tmp_path / "s.model", sample_bytes=first)
    again = train_tokenizer(docs[:20], 450, tmp_path / "a.model")
    full = train_tokenizer(docs, 450, tmp_path / "f.model")
    assert (tmp_path / "s.model").read_bytes() == (tmp_path / "a.model").read_bytes()
    assert (tmp_path / "s.model").read_bytes() != (tmp_path / "f.model").read_bytes()
    assert small.vocab_size == again.vocab_size == full.vocab_size == 450


def streamed(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamingDecoder(tok)
    return [dec.add(i) for i in ids] + [dec.flush()]


def test_streaming_decode_equals_full_decode_on_stories(tok, docs):
    for text in docs[:30] + UNSEEN:
        ids = tok.encode(text)
        assert "".join(streamed(tok, ids)) == tok.decode(ids) == text


def test_streaming_emits_whole_characters_only(tok):
    ids = tok.encode("🐉 x")
    pieces = streamed(tok, ids)
    assert pieces[:4] == ["", "", "", "🐉"]  # four byte tokens, one character
    assert "".join(pieces) == "🐉 x"
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_keeps_spaces(tok):
    text = "Once upon a time,  there was   a dog."
    pieces = streamed(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert sum(p.startswith(" ") for p in pieces) >= 5  # spaces arrive with their words


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 511), st.sampled_from([2 + b for b in
       (0x41, 0x80, 0x96, 0x81, 0xE2, 0xF0, 0x9F, 0xC3, 0xA9, 0xFF, 0xBF, 0xED)])), max_size=16))
def test_streaming_decode_equals_full_decode_on_any_ids(tok, ids):
    # Byte tokens are ids 2..257 (<0x00> is id 2); the list mixes them with pieces and eos,
    # including invalid and truncated UTF-8 sequences.
    assert "".join(streamed(tok, ids)) == tok.decode(ids)


def test_loading_a_missing_or_corrupt_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(TinyLMError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TinyLMError, match="not a sentencepiece model") as err:
        Tokenizer.load(bad)
    assert "\n" not in str(err.value)


def test_vocabulary_size_errors_are_translated(docs, tmp_path):
    with pytest.raises(TinyLMError, match=r"too large for this text \(it supports at most \d+\)"):
        train_tokenizer(docs[:20], 30000, tmp_path / "t.model")
    with pytest.raises(TinyLMError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(docs[:20], 100, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_byte_values_table(tok):
    assert (tok.byte_values >= 0).sum() == 256
    assert tok.byte_values[tok.encode("🐉")[0]] == 0xF0
    assert np.all(tok.byte_values[: tok.eos_id + 1] == -1)
