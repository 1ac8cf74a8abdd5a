"""Sentencepiece BPE tokenizer: train once on the training text, encode exactly, decode as a stream.

The settings make decoding the exact inverse of encoding (`decode(encode(s)) == s`):
identity normalisation (no NFKC), no dummy prefix, no whitespace collapsing, and byte fallback, so a
character the tokenizer never saw becomes its UTF-8 bytes instead of `<unk>`. The one character
sentencepiece cannot pass through is its own space marker U+2581 ("▁"), which it decodes as a space;
`Tokenizer.encode` spells that character as its three byte tokens instead.

Ids: 0 is `<unk>` (sentencepiece requires one; byte fallback means it is never produced), 1 is the
end-of-document token placed between documents, then the 256 byte tokens, then merges.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .config import ModelConfig
from .errors import TinyLMError

# The vocabulary is a model shape, so its default lives with the other shapes in config.py.
DEFAULT_VOCAB_SIZE: int = ModelConfig.vocab_size
EOS_PIECE = "<|endoftext|>"
N_SPECIAL = 2  # <unk>, <|endoftext|>
# Byte fallback needs all 256 byte tokens plus the specials; sentencepiece also wants every
# character it keeps, and says so (translated by `train_tokenizer`) when the vocabulary is short.
MIN_VOCAB_SIZE = 256 + N_SPECIAL + 1
# Training on a bounded sample keeps tokenizer training around a second; measured here, going from
# 1 MB to 6 MB of TinyStories changed bytes/token on held-out text by only ~1% at 4096 pieces.
TOKENIZER_SAMPLE_BYTES = 16 * 2**20
SPACE_MARKER = "\u2581"

# Everything that shapes the tokenizer; recorded in meta.json and part of the data cache key.
TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.9995,
    "unk_id": 0,
    "eos_id": 1,
    "bos_id": -1,
    "pad_id": -1,
    "eos_piece": EOS_PIECE,
    "max_sentence_length": 1 << 20,  # documents are training "sentences"; do not drop long ones
}


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


class Tokenizer:
    """A trained sentencepiece model with exact round trips and an end-of-document id."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: Path | None = None):
        self.sp = processor
        self.model_path = model_path
        self.vocab_size: int = processor.get_piece_size()
        self.eos_id: int = processor.eos_id()
        if self.eos_id < 0:
            raise TinyLMError(f"tokenizer {model_path} has no end-of-document token; "
                              "re-run `tinylm data prepare --force`")
        self._marker_ids = [processor.piece_to_id(f"<0x{b:02X}>")
                            for b in SPACE_MARKER.encode("utf-8")]
        # Byte value of each byte-fallback token, -1 for every other token (streaming decode).
        self.byte_values = np.full(self.vocab_size, -1, dtype=np.int16)
        for i in range(self.vocab_size):
            if processor.is_byte(i):
                self.byte_values[i] = int(processor.id_to_piece(i)[3:5], 16)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.model`; a missing or corrupt file is a one-line TinyLMError."""
        path = Path(path)
        if not path.is_file():
            raise TinyLMError(f"tokenizer file {path} does not exist; run `tinylm data prepare`")
        try:
            processor = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except (RuntimeError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TinyLMError(f"cannot load tokenizer {path} ({reason}); it is not a sentencepiece "
                              "model: re-run `tinylm data prepare --force`") from None
        return cls(processor, path)

    def encode(self, text: str) -> list[int]:
        if SPACE_MARKER in text:
            return self._encode_with_marker(text)
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts with all cores (sentencepiece's threaded batch encode)."""
        texts = list(texts)
        out = self.sp.encode(texts, out_type=int, num_threads=num_threads or _threads())
        for i, text in enumerate(texts):
            if SPACE_MARKER in text:  # rare: fix up those few
                out[i] = self._encode_with_marker(text)
        return out

    def _encode_with_marker(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(text.split(SPACE_MARKER)):
            if k:
                ids.extend(self._marker_ids)
            ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the end-of-document token decodes to nothing."""
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if ids else ""

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token contributes to decoded text (0 for the special tokens).

        Summed over a split's tokens this gives the split's text bytes, which bpb divides by.
        """
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.byte_values[i] >= 0:
                counts[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                counts[i] = len(self.sp.id_to_piece(i).replace(SPACE_MARKER, " ").encode("utf-8"))
        return counts

    def settings(self) -> dict[str, object]:
        return {**TRAINER_SETTINGS, "vocab_size": self.vocab_size}


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\).*<= (\d+)")
_TOO_SMALL = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str | Path,
                    sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
                    num_threads: int | None = None) -> Tokenizer:
    """Train a BPE tokenizer on (at most `sample_bytes` of) `texts` and write it to `model_path`.

    Texts are taken in order until the sample is full, so the same input gives the same tokenizer.
    Errors sentencepiece reports about the vocabulary size become one-line TinyLMErrors.
    """
    check_vocab_size(vocab_size)
    sample = list(_bounded(texts, sample_bytes))
    if not sample:
        raise TinyLMError("no text to train the tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
            num_threads=num_threads or _threads(), minloglevel=2, **TRAINER_SETTINGS)
    except RuntimeError as err:
        raise _vocab_error(err, vocab_size) from None
    model_path = Path(model_path)
    model_path.write_bytes(model.getvalue())
    return Tokenizer.load(model_path)


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TinyLMError(f"vocabulary size must be at least {MIN_VOCAB_SIZE} (256 byte tokens "
                          f"and {N_SPECIAL} special tokens come first), got {vocab_size}")


def _bounded(texts: Iterable[str], limit: int) -> Iterator[str]:
    used = 0
    for text in texts:
        if used >= limit:
            return
        if text:
            # The trainer would read a literal space marker as a space; keep it out of the sample.
            yield text.replace(SPACE_MARKER, " ")
            used += len(text.encode("utf-8"))


def _vocab_error(err: RuntimeError, vocab_size: int) -> TinyLMError:
    message = str(err)
    if m := _TOO_HIGH.search(message):
        most = int(m.group(2))
        return TinyLMError(f"vocabulary size {vocab_size} is too large for this text (it supports "
                           f"at most {most}); pass --vocab-size {most} or less, or use more text")
    if m := _TOO_SMALL.search(message):
        return TinyLMError(f"vocabulary size {vocab_size} is too small for this text: it needs "
                           f"at least {m.group(2)} to hold every character; pass a larger "
                           "--vocab-size")
    first = message.splitlines()[0] if message else type(err).__name__
    return TinyLMError(f"sentencepiece could not train the tokenizer: {first}")


class StreamingDecoder:
    """Turns token ids into text one at a time, emitting only text that later tokens cannot change.

    Pieces decode independently, so text is final at every token boundary except inside a run of
    byte tokens that may be an unfinished multi-byte UTF-8 character; such bytes are held back
    until the character completes (or turns out invalid). Joining every `add` result and the final
    `flush` gives exactly `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        cut = self._unfinished_start()
        if cut == 0:
            return ""
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self.tokenizer.decode(ready)

    def flush(self) -> str:
        ready, self._pending = self._pending, []
        return self.tokenizer.decode(ready)

    def _unfinished_start(self) -> int:
        """Index in pending where a possibly unfinished UTF-8 character starts (len if none)."""
        pending, values = self._pending, self.tokenizer.byte_values
        n = len(pending)
        # Look back at most 3 tokens: the longest UTF-8 character is 4 bytes.
        for back in range(1, min(3, n) + 1):
            b = int(values[pending[n - back]])
            if b < 0:
                return n  # a piece: any earlier bytes are already decided
            if b & 0xC0 == 0x80:
                continue  # continuation byte: the lead may be further back
            if b >= 0xC0:
                need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                return n - back if need > back else n
            return n  # ASCII byte
        return n
