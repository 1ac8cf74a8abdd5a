"""Text -> a trained tokenizer and flat token arrays on disk, once; batches for training and eval.

    sources (hub dataset or local .txt/.jsonl/.json/.parquet, all read through `datasets`)
      -> documents -> train/val split -> tokenizer trained on a bounded train sample
      -> [eos] doc [eos] doc ... [eos] as one uint16 (uint32 for big vocabularies) file per split
      -> meta.json (documents, tokens and UTF-8 bytes per split, tokenizer settings, hashes)

A prepared folder is keyed by a hash of the source contents and every setting, so the same inputs
reuse it instantly. It is built in a hidden temporary folder beside the target and renamed into
place at the end: an interrupted prepare never leaves a folder that looks usable.

Every split starts with the end-of-document token and ends each document with it, so each document
is also preceded by it (a start marker for the model), the first token is never a prediction target,
and the targets of a split encode exactly the split's text bytes — bpb needs that count.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TinyLMError
from .tokenizer import (
    DEFAULT_VOCAB_SIZE,
    TOKENIZER_SAMPLE_BYTES,
    TRAINER_SETTINGS,
    Tokenizer,
    check_vocab_size,
    train_tokenizer,
)

DEFAULT_DATASET = "roneneldan/TinyStories"
DOC_SEPARATOR = "<|endoftext|>"
SPLITS = ("train", "val")
FORMAT = "mlx-tinylm/prepared-data"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"

# Default token budget for hub data. The fastest laptop we expect trains a tiny model at about
# 300k tok/s, so a 5-minute budget consumes ~90M tokens; three times that (270M tokens, ~1.1 GB of
# TinyStories text, about half its train split) leaves room for longer budgets and faster machines
# without streaming the whole 2 GB split. Local files are used whole unless capped.
FASTEST_LAPTOP_TOKENS_PER_S = 300_000
BUDGET_SECONDS = 300
BUDGET_HEADROOM = 3
DEFAULT_HUB_MAX_TOKENS = BUDGET_HEADROOM * FASTEST_LAPTOP_TOKENS_PER_S * BUDGET_SECONDS
# A generous upper estimate of bytes per token; bounds how much text a token cap can use before
# the tokenizer exists (TinyStories measures ~4 at the default vocabulary).
MAX_BYTES_PER_TOKEN = 6

ENCODE_BATCH_BYTES = 4 * 2**20  # text handed to one threaded encode call
CHUNK_CHARS = 2**16  # longer documents are encoded (and capped) in pieces cut at line ends
READ_BATCH_ROWS = 4096

FILE_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                ".parquet": "parquet"}
HUB_VAL_SPLITS = ("validation", "valid", "val")


# ----- where things live ----------------------------------------------------------------------
def cache_dir() -> Path:
    """mlx-tinylm's cache folder: $TINYLM_HOME, else $XDG_CACHE_HOME/mlx-tinylm, else ~/.cache/…"""
    if home := os.environ.get("TINYLM_HOME"):
        return Path(home).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "mlx-tinylm"
    return Path.home() / ".cache" / "mlx-tinylm"


def data_cache_dir() -> Path:
    """Where prepared data folders go unless `out` is given."""
    return cache_dir() / "data"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----- a prepared folder ----------------------------------------------------------------------
@dataclass
class PreparedData:
    """A prepared data folder: tokenizer, one token array per split, and meta.json."""

    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    cache_hit: bool = False
    _arrays: dict[str, np.memmap] = field(default_factory=dict, repr=False)

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.meta["splits"][split]

    def tokens(self, split: str) -> np.memmap:
        """The split's flat token array, memory-mapped read-only."""
        if split not in self._arrays:
            info = self._split(split)
            self._arrays[split] = np.memmap(self.path / info["file"], dtype=self.meta["dtype"],
                                            mode="r", shape=(info["tokens"],))
        return self._arrays[split]

    def n_tokens(self, split: str) -> int:
        return int(self._split(split)["tokens"])

    def n_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text the split's tokens encode (the bpb denominator)."""
        return int(self._split(split)["bytes"])

    def n_documents(self, split: str) -> int:
        return int(self._split(split)["documents"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def summary(self) -> dict[str, Any]:
        """The facts `tinylm data prepare` prints."""
        out: dict[str, Any] = {"path": str(self.path), "cache_hit": self.cache_hit,
                               "source": self.meta["source"]["description"],
                               "vocab_size": self.vocab_size, "dtype": self.meta["dtype"]}
        for split in SPLITS:
            info = self._split(split)
            out[split] = {"documents": info["documents"], "tokens": info["tokens"],
                          "bytes": info["bytes"],
                          "bytes_per_token": round(info["bytes"] / max(info["tokens"], 1), 3),
                          "capped": info.get("capped", False)}
        out["seconds"] = self.meta["seconds"]
        return out


def load_prepared(path: str | Path) -> PreparedData:
    """Open a prepared folder; anything missing or inconsistent is a one-line TinyLMError."""
    path = Path(path)
    meta = _read_meta(path)
    if meta is None:
        raise TinyLMError(f"{path} is not a prepared data folder (no valid {META_FILE}); "
                          "run `tinylm data prepare`")
    try:
        tokenizer = Tokenizer.load(path / meta["tokenizer"]["file"])
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            info = meta["splits"][split]
            file = path / info["file"]
            expected = int(info["tokens"]) * itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise TinyLMError(f"{file} is missing or not {expected} bytes long; the prepared "
                                  "folder is damaged: re-run `tinylm data prepare --force`")
    except (KeyError, TypeError, ValueError) as err:
        raise TinyLMError(f"{path / META_FILE} is incomplete ({type(err).__name__}: {err}); "
                          "re-run `tinylm data prepare --force`") from None
    return PreparedData(path=path, meta=meta, tokenizer=tokenizer)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta


# ----- sources --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FileSource:
    path: Path
    kind: str  # a `datasets` packaged builder: text, json or parquet
    size: int
    digest: str

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "format": self.kind, "bytes": self.size,
                "blake2b": self.digest}


def _check_file(path: Path) -> _FileSource:
    """Fail early, with the file's name, on anything we cannot read as text."""
    if not path.exists():
        raise TinyLMError(f"{path} does not exist")
    if not path.is_file():
        raise TinyLMError(f"{path} is not a file")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise TinyLMError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use "
                          f"{', '.join(FILE_FORMATS)}")
    size = path.stat().st_size
    if size == 0:
        raise TinyLMError(f"{path} is empty")
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if kind != "parquet":
            if b"\0" in head:
                raise TinyLMError(f"{path} looks like a binary file (it contains NUL bytes), "
                                  "not UTF-8 text")
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as err:
                if err.start < len(head) - 4:  # not just a character cut by the 64 KiB read
                    raise TinyLMError(f"{path} is not UTF-8 text (invalid byte at offset "
                                      f"{err.start})") from None
        digest.update(head)
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return _FileSource(path, kind, size, digest.hexdigest())


@contextlib.contextmanager
def _datasets_without_torch() -> Iterator[Any]:
    """`datasets`, kept from importing PyTorch (2+ s here) just to build a streaming dataset.

    An IterableDataset shares a counter through torch whenever torch is installed, for
    DataLoader workers we never use. The flag is restored afterwards, and left alone when torch
    is already imported (then it costs nothing).
    """
    import datasets

    skip = "torch" not in sys.modules and datasets.config.TORCH_AVAILABLE
    if skip:
        datasets.config.TORCH_AVAILABLE = False
    try:
        yield datasets
    finally:
        if skip:
            datasets.config.TORCH_AVAILABLE = True


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets`' own log lines (it logs parse errors before raising them); we report
    every failure ourselves, as one line."""
    import datasets  # noqa: F401  (its import sets the level we override)

    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _clean(doc: str) -> str:
    return doc.strip("\r\n") if doc.strip() else ""


def _text_file_documents(source: _FileSource) -> Iterator[tuple[str, bool]]:
    """(document, is_running_text) from a .txt file, split on lines that are exactly the separator.

    A file without any separator line is one running text.
    """
    with _datasets_without_torch() as datasets:
        ds = datasets.load_dataset("text", data_files=str(source.path), split="train",
                                   streaming=True, keep_linebreaks=True, encoding="utf-8")
    lines: list[str] = []
    separated = False
    for batch in ds.iter(batch_size=READ_BATCH_ROWS):
        for line in batch["text"]:
            if line.rstrip("\r\n") == DOC_SEPARATOR:
                separated = True
                if doc := _clean("".join(lines)):
                    yield doc, False
                lines = []
            else:
                lines.append(line)
    rest = "".join(lines)
    if separated:
        if doc := _clean(rest):
            yield doc, False
    elif rest.strip():
        yield rest, True


def _table_file_documents(source: _FileSource, text_column: str) -> Iterator[tuple[str, bool]]:
    with _datasets_without_torch() as datasets:
        ds = datasets.load_dataset(source.kind, data_files=str(source.path), split="train",
                                   streaming=True)
    for batch in ds.iter(batch_size=READ_BATCH_ROWS):
        yield from ((text, False) for text in _column(batch, text_column, str(source.path)))


def _column(batch: dict[str, list], text_column: str, where: str) -> Iterator[str]:
    if text_column not in batch:
        columns = ", ".join(batch) or "none"
        raise TinyLMError(f"{where} has no {text_column!r} column (columns: {columns}); "
                          "pass --text-column NAME")
    for value in batch[text_column]:
        if value is None:
            continue
        if not isinstance(value, str):
            raise TinyLMError(f"{where}: column {text_column!r} holds {type(value).__name__} "
                              "values, not text; pass --text-column NAME")
        if value.strip():
            yield value


def read_documents(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """The documents of one local file, split exactly as `prepare` splits them."""
    for doc, _ in _file_documents(_check_file(Path(path)), text_column):
        yield doc


def _file_documents(source: _FileSource, text_column: str) -> Iterator[tuple[str, bool]]:
    """Documents of one file, with reading errors turned into one line naming the file."""
    count = 0
    try:
        if source.kind == "text":
            docs = _text_file_documents(source)
        else:
            docs = _table_file_documents(source, text_column)
        for item in docs:
            count += 1
            yield item
    except TinyLMError:
        raise
    except UnicodeDecodeError as err:
        raise TinyLMError(f"{source.path} is not UTF-8 text ({err.reason} at byte "
                          f"{err.start} of a block)") from None
    except Exception as err:  # pyarrow / datasets parse errors come in many types
        raise TinyLMError(f"cannot read {source.path} as {source.kind}: "
                          f"{_first_line(err)}") from None
    if count == 0:
        if source.kind == "text":
            raise TinyLMError(f"{source.path} has no documents (only blank text and "
                              f"{DOC_SEPARATOR} lines)")
        raise TinyLMError(f"{source.path} has no documents (no non-empty {text_column!r} values)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----- the hub --------------------------------------------------------------------------------
def _hub_unreachable(name: str, reason: str) -> TinyLMError:
    return TinyLMError(f"could not reach the Hugging Face Hub to load {name!r} ({reason}); to work "
                       "offline pass local files: tinylm data prepare --files train.txt "
                       "[--val-files valid.txt]")


def _probe_hub(name: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after `datasets`' minute of retries, when the hub is unreachable."""
    env = os.environ
    if any(env.get(k, "").lower() in ("1", "true", "yes") for k in
           ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return  # offline mode: `datasets` answers from its local cache (or says it cannot)
    if any(env.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct connection says nothing about the proxy
    endpoint = urllib.parse.urlsplit(env.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise _hub_unreachable(name, f"{host}: {err.strerror or err}") from None


def _hub_documents(name: str, text_column: str) -> tuple[Iterator[str], Iterator[str] | None, str]:
    """Streaming (train, validation or None, validation split name) documents of a hub dataset.

    `datasets` also accepts a local folder of data files here (split names from file names); that
    needs no network, so it skips the probe.
    """
    if not Path(name).is_dir():
        _probe_hub(name)
    try:
        with _datasets_without_torch() as datasets:
            splits = datasets.load_dataset(name, streaming=True)
    except ConnectionError as err:
        raise _hub_unreachable(name, _first_line(err)) from None
    except FileNotFoundError as err:  # DatasetNotFoundError is one
        raise TinyLMError(f"dataset {name!r} was not found on the Hub ({_first_line(err)}); check "
                          "the name or pass --files") from None
    except Exception as err:
        raise TinyLMError(f"cannot load dataset {name!r}: {_first_line(err)}") from None
    if "train" not in splits:
        raise TinyLMError(f"dataset {name!r} has no train split (splits: {', '.join(splits)})")
    val_name = next((s for s in HUB_VAL_SPLITS if s in splits), "")

    def stream(split: str) -> Iterator[str]:
        try:
            for batch in splits[split].iter(batch_size=READ_BATCH_ROWS):
                yield from _column(batch, text_column, f"dataset {name!r} split {split!r}")
        except TinyLMError:
            raise
        except ConnectionError as err:
            raise _hub_unreachable(name, f"connection lost: {_first_line(err)}") from None
        except Exception as err:
            raise TinyLMError(f"cannot read dataset {name!r} split {split!r}: "
                              f"{_first_line(err)}") from None

    return stream("train"), (stream(val_name) if val_name else None), val_name


# ----- splitting ------------------------------------------------------------------------------
def is_validation_document(text: str, val_fraction: float) -> bool:
    """Deterministic hold-out: a document's hash, not its position, decides its split."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2**64


def _running_text_cut(text: str, val_fraction: float) -> int:
    """Where a running text's held-out tail starts: the line end nearest (1 - f) of its length."""
    target = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n", 0, target)
    return cut + 1 if cut > 0 else target


def _chunks(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document): long texts cut at line ends so encode calls and caps stay small."""
    start = 0
    while len(text) - start > CHUNK_CHARS:
        end = text.rfind("\n", start, start + CHUNK_CHARS) + 1
        if end <= start:
            end = start + CHUNK_CHARS
        yield text[start:end], False
        start = end
    yield text[start:], True


# ----- writing token arrays -------------------------------------------------------------------
class _SplitWriter:
    """Appends encoded documents to one split's file, honouring its token and byte caps."""

    def __init__(self, path: Path, dtype: np.dtype, max_tokens: int | None,
                 max_bytes: int | None, on_read: Callable[[int], None]):
        self.path, self.dtype = path, dtype
        self.max_tokens, self.max_bytes = max_tokens, max_bytes
        self.on_read = on_read  # progress: bytes of text taken in
        self.tokenizer: Tokenizer | None = None
        self.file = open(path, "wb")
        self.documents = self.tokens = self.bytes = 0
        self.full = False
        self.pending: list[tuple[str, bool, int]] = []
        self.pending_bytes = 0
        self.open_doc = False  # a document whose last piece was not written yet

    def add(self, piece: str, ends_doc: bool) -> None:
        if self.full:
            return
        n = len(piece.encode("utf-8"))
        over = self.max_bytes is not None and self.bytes + self.pending_bytes + n > self.max_bytes
        if over and (self.pending or self.documents):  # a split always gets its first piece
            self.full = True
            return
        self.pending.append((piece, ends_doc, n))
        self.pending_bytes += n
        self.on_read(n)
        if self.tokenizer is not None and self.pending_bytes >= ENCODE_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        assert self.tokenizer is not None
        if not self.pending:
            return
        eos = self.tokenizer.eos_id
        if self.tokens == 0:
            self._write([[eos]])
        encoded = self.tokenizer.encode_batch([p for p, _, _ in self.pending])
        rows: list[list[int]] = []
        tokens = self.tokens
        for (_, ends_doc, n), ids in zip(self.pending, encoded, strict=True):
            if ends_doc:
                ids.append(eos)
            tokens += len(ids)
            over = self.max_tokens is not None and tokens > self.max_tokens
            if over and (rows or self.documents):
                self.full = True
                break
            rows.append(ids)
            self.bytes += n
            if not self.open_doc:
                self.documents += 1
            self.open_doc = not ends_doc
        self._write(rows)
        self.pending, self.pending_bytes = [], 0

    def _write(self, rows: list[list[int]]) -> None:
        total = sum(map(len, rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=self.dtype, count=total)
        flat.tofile(self.file)
        self.tokens += total

    def close(self) -> None:
        assert self.tokenizer is not None
        self.flush()
        if self.open_doc:  # cut by a cap inside a long document: still end with the marker
            self._write([[self.tokenizer.eos_id]])
        self.file.close()


# ----- prepare --------------------------------------------------------------------------------
def prepare(files: Iterable[str | Path] | None = None,
            val_files: Iterable[str | Path] | None = None,
            dataset: str | None = None,
            text_column: str = "text",
            vocab_size: int = DEFAULT_VOCAB_SIZE,
            val_fraction: float = 0.02,
            max_tokens: int | None = None,
            max_bytes: int | None = None,
            out: str | Path | None = None,
            force: bool = False,
            progress: bool = True) -> PreparedData:
    """Tokenizer + token arrays for local files or a hub dataset, reusing a matching cache.

    Without `val_files` (or a hub validation split) a deterministic `val_fraction` of documents,
    chosen by hash, is held out. `max_tokens` / `max_bytes` cap the training split (the
    validation split gets the same share as `val_fraction`); hub data defaults to
    DEFAULT_HUB_MAX_TOKENS, local files are used whole. Caps stop at a document boundary (at a
    line end inside a long running text), and each split keeps at least its first document.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if isinstance(val_files, (str, Path)):
        val_files = [val_files]
    files = [Path(f) for f in files] if files else []
    val_files = [Path(f) for f in val_files] if val_files else []
    if files and dataset:
        raise TinyLMError("pass either --files or --dataset, not both")
    if val_files and not files:
        raise TinyLMError("--val-files needs --files for the training text")
    if not files:
        dataset = dataset or DEFAULT_DATASET
        if max_tokens is None and max_bytes is None:
            max_tokens = DEFAULT_HUB_MAX_TOKENS
    check_vocab_size(vocab_size)
    if not 0 < val_fraction < 1:
        raise TinyLMError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    for flag, cap in (("--max-tokens", max_tokens), ("--max-bytes", max_bytes)):
        if cap is not None and cap <= 0:
            raise TinyLMError(f"{flag} must be a positive number, got {cap}")

    train_sources = [_check_file(p) for p in files]
    val_sources = [_check_file(p) for p in val_files]
    settings: dict[str, Any] = {"vocab_size": vocab_size, "text_column": text_column,
                                "max_tokens": max_tokens, "max_bytes": max_bytes}
    if not val_sources:
        settings["val_fraction"] = val_fraction  # only matters when we split ourselves
    tokenizer_settings = {**TRAINER_SETTINGS, "sample_bytes": TOKENIZER_SAMPLE_BYTES}
    if dataset:
        source_key: dict[str, Any] = {"dataset": dataset}
        slug = dataset.split("/")[-1]
    else:
        source_key = {"train": [s.digest for s in train_sources],
                      "val": [s.digest for s in val_sources]}
        slug = files[0].stem
    key = _digest({"format_version": FORMAT_VERSION, "source": source_key, "settings": settings,
                   "tokenizer": tokenizer_settings})
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-.") or "data"
    out = Path(out) if out is not None else data_cache_dir() / f"{slug}-v{vocab_size}-{key[:12]}"

    cached = _cached(out, key, force)
    if cached is not None:
        return cached
    tmp = _make_temp_folder(out)
    try:
        start = time.perf_counter()
        with _quiet_datasets():
            meta = _build(tmp, train_sources, val_sources, dataset, text_column, vocab_size,
                          val_fraction, max_tokens, max_bytes, progress)
        meta.update(key=key, settings=settings, seconds=round(time.perf_counter() - start, 3),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(out)


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=16).hexdigest()


def _cached(out: Path, key: str, force: bool) -> PreparedData | None:
    """The existing folder when it holds exactly these inputs; refuse to clobber anything else."""
    if not out.exists():
        return None
    meta = _read_meta(out)
    if meta is None:
        if out.is_dir() and not any(out.iterdir()):
            return None  # an empty folder is fine to fill
        raise TinyLMError(f"{out} exists and is not a prepared data folder; choose another --out")
    if meta.get("key") != key:
        if force:
            return None
        raise TinyLMError(f"{out} holds data prepared from other inputs or settings; pass "
                          "--force to replace it or choose another --out")
    if force:
        return None
    try:
        data = load_prepared(out)
    except TinyLMError:
        return None  # damaged: rebuild it
    data.cache_hit = True
    return data


def _make_temp_folder(out: Path) -> Path:
    """A hidden folder beside `out` (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_folders(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp
    except OSError as err:
        raise TinyLMError(f"cannot write the output folder {out} ({err.strerror or err}); pass "
                          "--out with a writable folder") from None


def _remove_stale_temp_folders(out: Path) -> None:
    """Leftovers of killed prepares (their process is gone)."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        try:
            pid = int(leftover.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            continue  # someone else's live process


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(tmp: Path, train_sources: list[_FileSource], val_sources: list[_FileSource],
           dataset: str | None, text_column: str, vocab_size: int, val_fraction: float,
           max_tokens: int | None, max_bytes: int | None, progress: bool) -> dict[str, Any]:
    """Read, split, train the tokenizer, encode and write; returns meta.json without the key."""
    # Where documents come from, and whether we split them ourselves.
    if dataset:
        train_docs, val_docs, val_name = _hub_documents(dataset, text_column)
        train_items: Iterator[tuple[str, bool]] = ((d, False) for d in train_docs)
        val_items = ((d, False) for d in val_docs) if val_docs is not None else None
        total_bytes = max_bytes
        how_val = (f"dataset split {val_name!r}" if val_docs is not None
                   else f"{val_fraction:g} of documents by hash")
        description = f"hub dataset {dataset} ({how_val} for validation)"
    else:
        train_items = itertools.chain.from_iterable(
            _file_documents(s, text_column) for s in train_sources)
        val_items = (itertools.chain.from_iterable(_file_documents(s, text_column)
                                                   for s in val_sources)
                     if val_sources else None)
        total_bytes = sum(s.size for s in train_sources + val_sources)
        if max_bytes is not None:
            total_bytes = min(total_bytes, max_bytes)
        names = ", ".join(s.path.name for s in train_sources)
        how_val = (", ".join(s.path.name for s in val_sources) if val_sources
                   else f"{val_fraction:g} of documents by hash")
        description = f"files {names} ({how_val} for validation)"

    # The validation split's caps are the training caps scaled by its share of the text.
    share = val_fraction / (1 - val_fraction)
    val_caps = [None if cap is None else max(1, math.ceil(cap * share))
                for cap in (max_tokens, max_bytes)]
    dtype = token_dtype(vocab_size)
    content = hashlib.blake2b(digest_size=16)
    clock = {"start": time.perf_counter()}
    with _Progress(progress, total_bytes) as bar, contextlib.ExitStack() as open_files:
        writers = {
            "train": _SplitWriter(tmp / "train.bin", dtype, max_tokens, max_bytes, bar.advance),
            "val": _SplitWriter(tmp / "val.bin", dtype, *val_caps, bar.advance),
        }
        for w in writers.values():
            open_files.callback(w.file.close)  # also on errors, before the folder is removed

        def routed() -> Iterator[tuple[str, str, bool]]:
            """(split, piece, ends_document) in reading order, stopping once the caps are met."""
            for text, running in train_items:
                if writers["train"].full:
                    break
                content.update(text.encode("utf-8"))
                if val_items is not None:
                    parts = [("train", text)]
                elif running:
                    cut = _running_text_cut(text, val_fraction)
                    parts = [("train", text[:cut]), ("val", text[cut:])]
                else:
                    split = "val" if is_validation_document(text, val_fraction) else "train"
                    parts = [(split, text)]
                for split, part in parts:
                    if part.strip():
                        for piece, ends in _chunks(part):
                            yield split, piece, ends
            for text, _ in val_items or ():
                if writers["val"].full:
                    break
                content.update(text.encode("utf-8"))
                for piece, ends in _chunks(text):
                    yield "val", piece, ends

        # Buffer the first stretch of training text, train the tokenizer on it, then stream.
        sample_limit = min(TOKENIZER_SAMPLE_BYTES, max_bytes or math.inf,
                           (max_tokens or math.inf) * MAX_BYTES_PER_TOKEN)
        stream = routed()
        sample_bytes = 0
        for split, piece, ends in stream:
            writers[split].add(piece, ends)
            if split == "train":
                sample_bytes += len(piece.encode("utf-8"))
                if sample_bytes >= sample_limit:
                    break
        sample = [p for p, _, _ in writers["train"].pending]
        if not sample:
            raise TinyLMError(_empty_split_message("training", val_items is None))
        bar.describe("training tokenizer")
        clock["sample_read"] = time.perf_counter()
        tokenizer = train_tokenizer(sample, vocab_size, tmp / TOKENIZER_FILE)
        clock["tokenizer_trained"] = time.perf_counter()
        bar.describe("tokenizing")
        for w in writers.values():
            w.tokenizer = tokenizer
            if w.pending_bytes >= ENCODE_BATCH_BYTES:
                w.flush()
        for split, piece, ends in stream:
            writers[split].add(piece, ends)
        for w in writers.values():
            w.close()
        clock["written"] = time.perf_counter()

    for split, w in writers.items():
        if w.documents == 0:
            raise TinyLMError(_empty_split_message("validation" if split == "val" else "training",
                                                   val_items is None))
    from . import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "source": {
            "description": description,
            "dataset": dataset,
            "train_files": [s.describe() for s in train_sources],
            "val_files": [s.describe() for s in val_sources],
        },
        "content_hash": content.hexdigest(),  # of the document text read, in order
        "dtype": dtype.name,
        "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "sample_bytes_used": sample_bytes,
                      "settings": {**TRAINER_SETTINGS, "sample_bytes": TOKENIZER_SAMPLE_BYTES}},
        "splits": {split: {"file": w.path.name, "documents": w.documents, "tokens": w.tokens,
                           "bytes": w.bytes, "capped": w.full}
                   for split, w in writers.items()},
        "phase_seconds": {  # reading overlaps encoding after the tokenizer sample
            "read_tokenizer_sample": round(clock["sample_read"] - clock["start"], 3),
            "train_tokenizer": round(clock["tokenizer_trained"] - clock["sample_read"], 3),
            "read_encode_write": round(clock["written"] - clock["tokenizer_trained"], 3),
        },
    }


def _empty_split_message(which: str, hash_split: bool) -> str:
    hint = ("pass --val-files, or more documents or a larger --val-fraction" if hash_split
            else "check the input files and caps")
    return f"the {which} split has no documents; {hint}"


class _Progress:
    """A rich progress bar (MB/s) on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int | None):
        self.enabled, self.total = enabled, total
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<18}"), BarColumn(),
                                DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("reading", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ----- batches --------------------------------------------------------------------------------
class BatchSampler:
    """Seeded random windows of `context + 1` tokens; batch k depends only on (seed, k).

    Its state is two integers, so a checkpoint can save it and a resumed run sees exactly the
    batches the uninterrupted run would have seen.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int = 0):
        if len(tokens) < context + 1:
            raise TinyLMError(f"the token array has {len(tokens)} tokens, fewer than context + 1 "
                              f"= {context + 1}; use more text or a shorter context")
        self.tokens = tokens
        self.batch_size, self.context, self.seed = batch_size, context, seed
        self.step = 0
        self._offsets = np.arange(context + 1)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), int32 arrays of shape (batch_size, context)."""
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.context, size=self.batch_size)
        self.step += 1
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "context": self.context}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in ("batch_size", "context"):
            if state.get(name, getattr(self, name)) != getattr(self, name):
                raise TinyLMError(f"sampler state was saved with {name}={state[name]}, but this "
                                  f"run uses {getattr(self, name)}; resume with the same settings")
        self.seed, self.step = int(state["seed"]), int(state["step"])


def n_eval_windows(n_tokens: int, context: int) -> int:
    """Windows needed to predict every token after the first exactly once."""
    return math.ceil(max(n_tokens - 1, 0) / context)


def eval_batches(tokens: np.ndarray, context: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed, non-overlapping windows covering every target of the split exactly once.

    Yields (inputs, targets, mask), all (batch_size, context); the last window and batch are
    padded and `mask` (bool) marks the real targets. Shapes never change, so a compiled
    evaluation function is traced once.
    """
    n_targets = len(tokens) - 1
    windows = n_eval_windows(len(tokens), context)
    for first in range(0, windows, batch_size):
        inputs = np.zeros((batch_size, context), np.int32)
        targets = np.zeros((batch_size, context), np.int32)
        mask = np.zeros((batch_size, context), bool)
        for row, w in enumerate(range(first, min(first + batch_size, windows))):
            start = w * context
            length = min(context, n_targets - start)
            inputs[row, :length] = tokens[start:start + length]
            targets[row, :length] = tokens[start + 1:start + 1 + length]
            mask[row, :length] = True
        yield inputs, targets, mask
