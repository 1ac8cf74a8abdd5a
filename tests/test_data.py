"""Data preparation, the cache, bad inputs, and the batch samplers — on small TinyStories slices."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_tinylm  # noqa: F401  (sets up BLAS before anything imports mlx.core)
from mlx_tinylm import data
from mlx_tinylm.data import BatchSampler, eval_batches, load_prepared, prepare
from mlx_tinylm.errors import TinyLMError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinystories"
ROOT = Path(__file__).resolve().parents[1]
SEP = "<|endoftext|>"
VOCAB = 512


def stories(name: str, n: int) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    docs = [d.strip("\n") for d in re.split(r"(?m)^<\|endoftext\|>$\n?", text)]
    return [d for d in docs if d.strip()][:n]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n{SEP}\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def train_docs() -> list[str]:
    return stories("train.txt", 200)


@pytest.fixture(scope="module")
def val_docs() -> list[str]:
    return stories("valid.txt", 30)


@pytest.fixture(scope="module")
def files(tmp_path_factory, train_docs, val_docs) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("slice")
    return (write_txt(folder / "train.txt", train_docs),
            write_txt(folder / "valid.txt", val_docs))


@pytest.fixture(scope="module")
def prepared(files, tmp_path_factory) -> data.PreparedData:
    out = tmp_path_factory.mktemp("prep") / "slice"
    return prepare(files=[files[0]], val_files=[files[1]], vocab_size=VOCAB, out=out,
                   progress=False)


@pytest.fixture(scope="module")
def hash_split(files, tmp_path_factory) -> data.PreparedData:
    out = tmp_path_factory.mktemp("prep") / "hash"
    return prepare(files=[files[0]], vocab_size=VOCAB, out=out, progress=False)


def documents_of(prep: data.PreparedData, split: str) -> list[str]:
    """Decode a split back into its documents (they are separated by the eos token)."""
    tokens = np.asarray(prep.tokens(split))
    eos = prep.tokenizer.eos_id
    cuts = np.flatnonzero(tokens == eos)
    return [prep.tokenizer.decode(tokens[a + 1:b]) for a, b in zip(cuts[:-1], cuts[1:],
                                                                     strict=True)]


# ----- what a prepared folder holds -----------------------------------------------------------
def test_splits_decode_to_exactly_the_input_documents(prepared, train_docs, val_docs):
    assert documents_of(prepared, "train") == train_docs
    assert documents_of(prepared, "val") == val_docs
    assert prepared.n_documents("train") == len(train_docs)


def test_meta_byte_counts_equal_utf8_length_of_decoded_splits(prepared, hash_split):
    for prep in (prepared, hash_split):
        meta = json.loads((prep.path / "meta.json").read_text())
        for split in data.SPLITS:
            decoded = prep.tokenizer.decode(prep.tokens(split))
            assert meta["splits"][split]["bytes"] == len(decoded.encode("utf-8"))
            assert prep.n_bytes(split) == len(decoded.encode("utf-8"))
            assert meta["splits"][split]["tokens"] == len(prep.tokens(split))


def test_every_document_is_between_end_of_document_tokens(prepared):
    tokens = prepared.tokens("train")
    eos = prepared.tokenizer.eos_id
    assert tokens[0] == eos and tokens[-1] == eos
    assert int((np.asarray(tokens) == eos).sum()) == prepared.n_documents("train") + 1


def test_token_array_is_uint16_memmap(prepared):
    tokens = prepared.tokens("train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert int(tokens.max()) < prepared.tokenizer.vocab_size
    assert data.token_dtype(70000) == np.uint32


def test_meta_records_tokenizer_sources_and_version(prepared, files):
    meta = prepared.meta
    assert meta["package_version"] == mlx_tinylm.__version__
    assert meta["tokenizer"]["vocab_size"] == VOCAB
    assert meta["tokenizer"]["settings"]["byte_fallback"] is True
    assert meta["source"]["train_files"][0]["path"] == str(files[0].resolve())
    assert len(meta["content_hash"]) == 32 and len(meta["key"]) == 32
    assert "valid.txt" in meta["source"]["description"]


def test_train_and_validation_splits_share_no_document(hash_split, train_docs):
    train, val = documents_of(hash_split, "train"), documents_of(hash_split, "val")
    assert val and not set(train) & set(val)
    assert sorted(train + val) == sorted(train_docs)
    expected_val = [d for d in train_docs if data.is_validation_document(d, 0.02)]
    assert val == expected_val  # chosen by hash, so the same in every run


def test_hold_out_does_not_depend_on_document_order(train_docs, tmp_path):
    a = prepare(files=[write_txt(tmp_path / "a.txt", train_docs)], vocab_size=VOCAB,
                out=tmp_path / "a", progress=False)
    b = prepare(files=[write_txt(tmp_path / "b.txt", train_docs[::-1])], vocab_size=VOCAB,
                out=tmp_path / "b", progress=False)
    assert sorted(documents_of(a, "val")) == sorted(documents_of(b, "val"))


def test_token_caps_limit_the_training_split(files, tmp_path):
    capped = prepare(files=[files[0]], val_files=[files[1]], vocab_size=VOCAB, max_tokens=5000,
                     out=tmp_path / "t", progress=False)
    assert 4000 < capped.n_tokens("train") <= 5000
    assert capped.meta["splits"]["train"]["capped"] is True
    # The validation cap is the same share (~103 tokens): less than a story, so it keeps one.
    assert capped.n_documents("val") == 1
    by_bytes = prepare(files=[files[0]], val_files=[files[1]], vocab_size=VOCAB,
                       max_bytes=20_000, out=tmp_path / "b", progress=False)
    assert 15_000 < by_bytes.n_bytes("train") <= 20_000


def test_jsonl_and_parquet_are_read_through_datasets(train_docs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps({"story": d, "n": i}) + "\n"
                             for i, d in enumerate(train_docs[:100])))
    parquet = tmp_path / "s.parquet"
    pq.write_table(pa.table({"story": train_docs[100:]}), parquet)
    prep = prepare(files=[jsonl, parquet], text_column="story", vocab_size=VOCAB,
                   out=tmp_path / "o", progress=False)
    got = documents_of(prep, "train") + documents_of(prep, "val")
    assert sorted(got) == sorted(train_docs)


def test_dataset_streams_its_own_splits_within_the_token_budget(train_docs, val_docs, tmp_path):
    # The --dataset path, run offline: `datasets` streams a local folder just like a hub repo.
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, docs in (("train", train_docs), ("validation", val_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                      for d in docs))
    whole = prepare(dataset=str(folder), vocab_size=VOCAB, out=tmp_path / "w", progress=False)
    assert documents_of(whole, "train") == train_docs
    assert documents_of(whole, "val") == val_docs  # the dataset's own split, not a hash split
    assert "split 'validation'" in whole.meta["source"]["description"]
    assert whole.meta["settings"]["max_tokens"] == data.DEFAULT_HUB_MAX_TOKENS
    capped = prepare(dataset=str(folder), vocab_size=VOCAB, max_tokens=20_000,
                     out=tmp_path / "c", progress=False)
    assert 18_000 < capped.n_tokens("train") <= 20_000
    assert documents_of(capped, "train") == train_docs[:capped.n_documents("train")]
    assert 1 <= capped.n_documents("val") < len(val_docs)


def test_text_without_separators_is_one_running_text(train_docs, tmp_path):
    text = "\n".join(train_docs[:60])
    running = tmp_path / "book.txt"
    running.write_text(text)
    prep = prepare(files=[running], vocab_size=VOCAB, out=tmp_path / "o", progress=False)
    train, val = documents_of(prep, "train"), documents_of(prep, "val")
    assert len(train) == len(val) == 1  # no end-of-document tokens inside
    assert train[0] + val[0] == text  # the held-out tail starts at a line
    assert train[0].endswith("\n")
    assert 0.01 < len(val[0]) / len(text) < 0.05


# ----- the cache ------------------------------------------------------------------------------
def test_second_prepare_is_a_cache_hit(files, tmp_path):
    kwargs = dict(files=[files[0]], val_files=[files[1]], vocab_size=VOCAB,
                  out=tmp_path / "c", progress=False)
    first = prepare(**kwargs)
    stamp = (tmp_path / "c" / "train.bin").stat().st_mtime_ns
    start = time.perf_counter()
    second = prepare(**kwargs)
    assert second.cache_hit and not first.cache_hit
    assert time.perf_counter() - start < 1.0
    assert (tmp_path / "c" / "train.bin").stat().st_mtime_ns == stamp
    forced = prepare(**kwargs, force=True)
    assert not forced.cache_hit
    assert np.array_equal(forced.tokens("train"), first.tokens("train"))


def test_changed_settings_do_not_reuse_the_cache(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path))
    a = prepare(files=[files[0]], vocab_size=VOCAB, progress=False)
    b = prepare(files=[files[0]], vocab_size=VOCAB + 64, progress=False)
    c = prepare(files=[files[0]], vocab_size=VOCAB, progress=False)
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path / "data"
    assert c.cache_hit and c.path == a.path
    with pytest.raises(TinyLMError, match="other inputs or settings"):
        prepare(files=[files[0]], vocab_size=VOCAB + 64, out=a.path, progress=False)


def test_cache_folder_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYLM_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "mlx-tinylm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "mlx-tinylm"
    monkeypatch.setenv("TINYLM_HOME", str(tmp_path / "th"))
    assert data.cache_dir() == tmp_path / "th"
    assert data.data_cache_dir() == tmp_path / "th" / "data"


def test_damaged_folder_is_refused_and_rebuilt(files, tmp_path):
    out = tmp_path / "d"
    prepare(files=[files[0]], vocab_size=VOCAB, out=out, progress=False)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(TinyLMError, match="damaged"):
        load_prepared(out)
    rebuilt = prepare(files=[files[0]], vocab_size=VOCAB, out=out, progress=False)
    assert not rebuilt.cache_hit and rebuilt.n_tokens("train") > 1000
    with pytest.raises(TinyLMError, match="not a prepared data folder"):
        load_prepared(tmp_path / "missing")
    meta = json.loads((out / "meta.json").read_text())
    del meta["splits"]["val"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TinyLMError, match="incomplete"):
        load_prepared(out)


def test_interrupted_prepare_leaves_no_usable_looking_folder(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_tinylm", "data", "prepare", "--files",
         str(DATA / "train.txt"), "--val-files", str(DATA / "valid.txt"), "--vocab-size",
         str(VOCAB), "--out", str(out)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".killed.tmp-*")) and time.time() < deadline:
        assert proc.poll() is None, "prepare finished before it could be interrupted"
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(TinyLMError):
        load_prepared(out)
    # The next prepare cleans up the leftover and succeeds.
    assert list(tmp_path.glob(".killed.tmp-*"))
    slice_file = write_txt(tmp_path / "small.txt", stories("train.txt", 100))
    prepare(files=[slice_file], vocab_size=VOCAB, out=out, progress=False)
    assert not list(tmp_path.glob(".killed.tmp-*"))


# ----- the command line -----------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_tinylm", "data", "prepare", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_prepares_then_hits_the_cache(files, tmp_path):
    args = ["--files", str(files[0]), str(files[1]), "--vocab-size", str(VOCAB),
            "--out", str(tmp_path / "cli"), "--json"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["cache_hit"] is False and summary["vocab_size"] == VOCAB
    # `--files a b` took both files: 230 documents between the two splits.
    assert summary["train"]["documents"] + summary["val"]["documents"] == 230
    second = run_cli(*args)
    assert json.loads(second.stdout)["cache_hit"] is True
    plain = run_cli(*args[:-1])
    assert plain.returncode == 0 and "bytes/token" in plain.stdout and "cache hit" in plain.stdout


def bad_input_cases(tmp: Path, files: tuple[Path, Path]) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "seps.txt").write_text(f"{SEP}\n\n  \n{SEP}\n")
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp / "latin1.txt").write_bytes("Zoë and the café\n".encode("latin-1") * 50)
    (tmp / "late.txt").write_bytes(b"A story.\n" * 10_000 + "caf\xe9".encode("latin-1"))
    (tmp / "rows.jsonl").write_text('{"story": "Once upon a time"}\n')
    (tmp / "broken.json").write_text('{"text": "Once upon a ')
    (tmp / "afile").write_text("x")
    out = ["--out", str(tmp / "out")]
    return {
        "missing path": (["--files", str(tmp / "nope.txt"), *out], "does not exist"),
        "empty file": (["--files", str(tmp / "empty.txt"), *out], "is empty"),
        "no documents": (["--files", str(tmp / "seps.txt"), *out], "has no documents"),
        "binary file": (["--files", str(tmp / "binary.txt"), *out], "binary"),
        "not utf-8": (["--files", str(tmp / "latin1.txt"), *out], "not UTF-8"),
        "not utf-8 after the first block": (["--files", str(tmp / "late.txt"), *out],
                                            "not UTF-8"),
        "broken json": (["--files", str(tmp / "broken.json"), *out], "cannot read"),
        "json without column": (["--files", str(tmp / "rows.jsonl"), *out],
                                "no 'text' column (columns: story)"),
        "vocabulary too large": (["--files", str(files[0]), "--vocab-size", "40000", *out],
                                 "too large for this text"),
        "vocabulary below minimum": (["--files", str(files[0]), "--vocab-size", "100", *out],
                                     "at least 259"),
        "unwritable output": (["--files", str(files[0]), "--vocab-size", str(VOCAB), "--out",
                               str(tmp / "afile" / "sub")], "cannot write the output folder"),
    }


def test_bad_inputs_fail_with_one_line_and_leave_nothing(files, tmp_path):
    cases = bad_input_cases(tmp_path, files)
    # Each case gets its own output folder so they can run side by side.
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "mlx_tinylm", "data", "prepare",
         *[str(tmp_path / name.replace(" ", "_")) if a == str(tmp_path / "out") else a
           for a in args]],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode != 0, name
        assert len(lines) == 1 and cases[name][1] in lines[0], (name, stderr)
        assert "Traceback" not in stderr + stdout, name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "_" in p.name]
    assert leftovers == [], leftovers  # no output folder, no temporary folder


def test_unreachable_hub_says_so_and_how_to_work_offline(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "TINYLM_HOME": str(tmp_path),
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HTTPS_PROXY": "",
           "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
    result = run_cli("--dataset", "roneneldan/TinyStories", env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1
    assert "could not reach the Hugging Face Hub" in lines[0] and "--files" in lines[0]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_unwritable_folder_for_a_normal_user(files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(TinyLMError, match="cannot write"):
        prepare(files=[files[0]], vocab_size=VOCAB, out=locked / "o", progress=False)


# ----- batches --------------------------------------------------------------------------------
def test_sampler_gives_contiguous_shifted_windows(prepared):
    tokens = np.asarray(prepared.tokens("train"))
    sampler = BatchSampler(prepared.tokens("train"), batch_size=8, context=32, seed=1)
    x, y = sampler.next()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        starts = [s for s in np.flatnonzero(tokens[:-32] == row_x[0])
                  if np.array_equal(tokens[s:s + 33], np.r_[row_x, row_y[-1]])]
        assert starts  # the window is a real slice of the array


def test_sampler_is_reproducible_and_resumable(prepared):
    tokens = prepared.tokens("train")
    a = BatchSampler(tokens, 4, 16, seed=7)
    first = [a.next() for _ in range(5)]
    saved = json.loads(json.dumps(a.state_dict()))
    rest = [a.next() for _ in range(3)]
    b = BatchSampler(tokens, 4, 16, seed=0)
    b.load_state_dict(saved)
    resumed = [b.next() for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(rest, resumed, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    again = BatchSampler(tokens, 4, 16, seed=7).next()
    assert np.array_equal(again[0], first[0][0])
    other = BatchSampler(tokens, 4, 16, seed=8).next()
    assert not np.array_equal(other[0], first[0][0])
    assert len(json.dumps(saved)) < 200
    with pytest.raises(TinyLMError, match="context"):
        BatchSampler(tokens, 4, 32).load_state_dict(saved)


def test_sampler_refuses_arrays_shorter_than_a_window():
    with pytest.raises(TinyLMError, match="fewer than context"):
        BatchSampler(np.zeros(10, np.uint16), 2, 16)


def test_eval_batches_cover_every_target_once(prepared):
    tokens = np.asarray(prepared.tokens("val"))
    context, batch = 64, 5
    seen_targets, seen_inputs = [], []
    for x, y, mask in eval_batches(prepared.tokens("val"), context, batch):
        assert x.shape == y.shape == mask.shape == (batch, context)
        seen_targets.append(y[mask])
        seen_inputs.append(x[mask])
    assert np.array_equal(np.concatenate(seen_targets), tokens[1:])
    assert np.array_equal(np.concatenate(seen_inputs), tokens[:-1])
    n_windows = data.n_eval_windows(len(tokens), context)
    assert len(seen_targets) == -(-n_windows // batch)
    # The masked targets encode exactly the split's bytes: the bpb denominator.
    counts = prepared.tokenizer.token_bytes()
    assert counts[np.concatenate(seen_targets)].sum() == prepared.n_bytes("val")
