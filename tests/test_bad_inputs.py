"""Hostile input to every command: each case exits non-zero with one line on stderr that says what
is wrong (the needle), and no traceback anywhere.

One table covers `info`, `presets`, `plan`, `sweep`, `data prepare`, `train` (new runs and
--resume), `sample` and `eval`; the processes run in parallel, as a user's shell would start them.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_failure, run_cli

import mlx_tinylm  # noqa: F401  (sets up BLAS before MLX)
from mlx_tinylm import checkpoint
from mlx_tinylm import train as training
from mlx_tinylm.config import OptimConfig, TrainConfig
from mlx_tinylm.dashboard import PlainLog
from mlx_tinylm.data import prepare

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--context", "32",
        "--batch-size", "8", "--no-dashboard", "--engine", "mlx"]


class Workspace:
    """Hostile files and damaged copies of a real prepared folder and a real trained run."""

    def __init__(self, root: Path, prepared, slice_files) -> None:
        self.root = root
        self.data = str(prepared.path)
        self.train_txt, self.valid_txt = (str(p) for p in slice_files)
        self.missing = str(root / "missing")
        self.dir = str(self.folder("a-folder"))
        self.empty = self.file("empty.txt", b"")
        self.binary = self.file("binary.txt", bytes(range(256)) * 64)
        self.latin1 = self.file("latin1.txt", "Once upon a time, a café.\n".encode("latin-1") * 50)
        self.csv = self.file("table.csv", b"text\nhello\n")
        self.bad_jsonl = self.file("bad.jsonl", b'{"text": "a story"}\n{"text": oops\n')
        self.nocol_jsonl = self.file("nocol.jsonl", b'{"story": "a story"}\n' * 20)
        self.bad_parquet = self.file("bad.parquet", b"PAR1" + bytes(range(200)) + b"PAR1")
        self.separators = self.file("separators.txt", b"<|endoftext|>\n\n<|endoftext|>\n")
        self.a_file = self.file("a-file", b"not a folder\n")

        # Damaged prepared folders.
        self.data_meta = self.copy(prepared.path, "data-meta", lambda d: self.cut(d / "meta.json"))
        self.data_bin = self.copy(prepared.path, "data-bin", lambda d: self.cut(d / "train.bin"))
        self.data_tok = self.copy(prepared.path, "data-tok",
                                  lambda d: (d / "tokenizer.model").write_bytes(b"\x08\x01junk"))
        self.other_data = str(prepare(files=[self.train_txt], val_files=[self.valid_txt],
                                      vocab_size=400, out=root / "other-data", progress=False).path)

        # A real (tiny) trained run, and damaged copies of it.
        run = root / "run"
        spec = training.build_spec(
            prepared, preset="tiny", out=run, optim=OptimConfig(),
            overrides={"d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 32},
            train_cfg=TrainConfig(minutes=None, steps=3, batch_size=8, engine="mlx",
                                  eval_batches=1, eval_every=1.0, sample_tokens=0))
        training.train(spec, prepared, PlainLog(io.StringIO()))
        self.run = str(run)
        cfg = run / checkpoint.CONFIG
        self.run_newer = self.copy(run, "run-newer", lambda d: self.edit_config(
            d, lambda c: c.update(format_version=checkpoint.FORMAT_VERSION + 1)))
        self.run_binary_config = self.copy(run, "run-binary-config", lambda d: (
            d / checkpoint.CONFIG).write_bytes(b"\xff\xfe\x00garbage"))
        self.run_no_model = self.copy(run, "run-no-model", lambda d: (
            d / checkpoint.CONFIG).write_text('{"format_version": 1}'))
        self.run_mismatch = self.copy(run, "run-mismatch", lambda d: self.edit_config(
            d, lambda c: c["model"].update(d_model=64)))
        self.run_cut_weights = self.copy(run, "run-cut-weights", lambda d: (
            self.cut(d / checkpoint.WEIGHTS), self.cut(d / "checkpoint" / checkpoint.WEIGHTS)))
        self.run_bad_state = self.copy(run, "run-bad-state", lambda d: (
            d / "checkpoint" / checkpoint.STATE).write_text('{"loop": {"step": "seven"}}'))
        self.run_no_ckpt = self.copy(run, "run-no-ckpt", lambda d: (
            shutil.rmtree(d / "checkpoint"), (d / checkpoint.WEIGHTS).unlink()))
        self.run_data_gone = self.copy(run, "run-data-gone", lambda d: self.edit_config(
            d, lambda c: c["data"].update(path=self.missing)))
        self.run_other_data = self.copy(run, "run-other-data", lambda d: self.edit_config(
            d, lambda c: c["data"].update(path=self.other_data)))
        self.run_bad_tok = self.copy(run, "run-bad-tok", lambda d: (
            d / checkpoint.TOKENIZER).write_bytes(bytes(range(256))))
        self.run_wrong_tok = self.copy(run, "run-wrong-tok", lambda d: shutil.copy(
            Path(self.other_data) / "tokenizer.model", d / checkpoint.TOKENIZER))
        self.run_nan = self.copy(run, "run-nan", lambda d: checkpoint.save_arrays(
            d / checkpoint.WEIGHTS, {k: np.full_like(v, np.nan) for k, v in
                                     checkpoint.load_arrays(d / checkpoint.WEIGHTS).items()}))
        self.run_header = self.copy(run, "run-header", lambda d: self.bad_header(
            d / checkpoint.WEIGHTS))
        assert cfg.is_file()

    def file(self, name: str, content: bytes) -> str:
        path = self.root / name
        path.write_bytes(content)
        return str(path)

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def copy(self, src: Path, name: str, damage) -> str:
        dst = self.root / name
        shutil.copytree(src, dst)
        damage(dst)
        return str(dst)

    @staticmethod
    def cut(path: Path) -> None:
        """Truncate a file to half its length (an interrupted copy or download)."""
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    @staticmethod
    def edit_config(run: Path, change) -> None:
        cfg = json.loads((run / checkpoint.CONFIG).read_text())
        change(cfg)
        (run / checkpoint.CONFIG).write_text(json.dumps(cfg))

    @staticmethod
    def bad_header(path: Path) -> None:
        """A header that promises far more data than the file holds."""
        header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [10**9],
                                                   "data_offsets": [0, 4 * 10**9]}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


# (case id, argv, needle in the one stderr line). Attribute names refer to Workspace paths.
CASES: list[tuple[str, list[str], str]] = [
    # info
    ("info-probe-nan", ["info", "--probe-seconds", "nan"], "--probe-seconds"),
    ("info-probe-text", ["info", "--probe-seconds", "abc"], "valid number"),
    ("unknown-command", ["frobnicate"], "no such command"),
    ("unknown-flag", ["train", "--bogus"], "no such option"),
    ("presets-unknown-flag", ["presets", "--bogus"], "no such option"),
    # plan and sweep
    ("plan-minutes-nan", ["plan", "--minutes", "nan"], "--minutes"),
    ("plan-params-text", ["plan", "--params", "abc", "--tokens", "1M"], "cannot read 'abc'"),
    ("plan-params-alone", ["plan", "--params", "10M"], "go together"),
    ("plan-batch-zero", ["plan", "--params", "1M", "--tokens", "1M", "--batch-size", "0"],
     "--batch-size"),
    ("plan-seconds-inf", ["plan", "--params", "1M", "--tokens", "1M", "--seconds", "inf"],
     "--seconds"),
    ("plan-engine-unknown", ["plan", "--params", "1M", "--tokens", "1M", "--engine", "cuda"],
     "--engine"),
    ("sweep-unknown-preset", ["sweep", "--data", "{data}", "--presets", "nano,gigantic"],
     "unknown preset"),
    ("sweep-no-presets", ["sweep", "--data", "{data}", "--presets", ","], "at least one"),
    ("sweep-two-budgets", ["sweep", "--minutes", "1", "--tokens", "5"], "only one of"),
    ("sweep-data-missing", ["sweep", "--data", "{missing}"], "not a prepared data folder"),
    ("sweep-out-is-file", ["sweep", "--data", "{data}", "--presets", "nano", "--tokens", "100",
                           "--out", "{a_file}"], "cannot create the sweep folder"),
    # data prepare
    ("prepare-missing", ["data", "prepare", "--files", "{missing}"], "does not exist"),
    ("prepare-empty", ["data", "prepare", "--files", "{empty}"], "is empty"),
    ("prepare-binary", ["data", "prepare", "--files", "{binary}"], "binary"),
    ("prepare-latin1", ["data", "prepare", "--files", "{latin1}"], "not utf-8"),
    ("prepare-csv", ["data", "prepare", "--files", "{csv}"], "unsupported file type"),
    ("prepare-folder", ["data", "prepare", "--files", "{dir}"], "not a file"),
    ("prepare-bad-jsonl", ["data", "prepare", "--files", "{bad_jsonl}"], "cannot read"),
    ("prepare-no-column", ["data", "prepare", "--files", "{nocol_jsonl}"], "'text' column"),
    ("prepare-bad-parquet", ["data", "prepare", "--files", "{bad_parquet}"], "cannot read"),
    ("prepare-only-separators", ["data", "prepare", "--files", "{separators}"], "no documents"),
    ("prepare-vocab-tiny", ["data", "prepare", "--files", "{train_txt}", "--vocab-size", "10"],
     "vocabulary size"),
    ("prepare-val-fraction", ["data", "prepare", "--files", "{train_txt}", "--val-fraction",
                              "1.5"], "--val-fraction"),
    ("prepare-out-is-file", ["data", "prepare", "--files", "{train_txt}", "--out", "{a_file}"],
     "not a prepared data folder"),
    # train: data
    ("train-data-missing", ["train", "--data", "{missing}", *TINY], "not a prepared data folder"),
    ("train-data-cut-meta", ["train", "--data", "{data_meta}", *TINY], "not a prepared data"),
    ("train-data-cut-tokens", ["train", "--data", "{data_bin}", *TINY], "damaged"),
    ("train-data-bad-tokenizer", ["train", "--data", "{data_tok}", *TINY], "tokenizer"),
    ("train-files-binary", ["train", "--files", "{binary}", *TINY], "binary"),
    ("train-data-and-files", ["train", "--data", "{data}", "--files", "{train_txt}", *TINY],
     "only one of"),
    # train: flags
    ("train-unknown-preset", ["train", "--data", "{data}", "--preset", "gigantic"],
     "unknown preset"),
    ("train-minutes-nan", ["train", "--data", "{data}", "--minutes", "nan", *TINY], "--minutes"),
    ("train-two-budgets", ["train", "--data", "{data}", "--minutes", "1", "--steps", "3", *TINY],
     "only one of"),
    ("train-lr-nan", ["train", "--data", "{data}", "--lr", "nan", *TINY], "learning rate"),
    ("train-heads-indivisible", ["train", "--data", "{data}", *TINY, "--d-model", "30",
                                 "--heads", "4"], "divisible"),
    ("train-context-zero", ["train", "--data", "{data}", *TINY, "--context", "0"],
     "context_length"),
    ("train-engine-unknown", ["train", "--data", "{data}", *TINY, "--engine", "cuda"],
     "--engine"),
    ("train-checkpoint-every", ["train", "--data", "{data}", *TINY, "--checkpoint-every", "-1"],
     "checkpoint interval"),
    ("train-out-is-file", ["train", "--data", "{data}", "--steps", "2", *TINY, "--out",
                           "{a_file}"], "cannot create the run folder"),
    ("train-out-is-a-run", ["train", "--data", "{data}", "--steps", "2", *TINY, "--out",
                            "{run}"], "already holds a run"),
    # train --resume
    ("resume-no-out", ["train", "--resume"], "needs --out"),
    ("resume-missing", ["train", "--resume", "--out", "{missing}"], "does not exist"),
    ("resume-no-checkpoint", ["train", "--resume", "--out", "{run_no_ckpt}"], "no checkpoint"),
    ("resume-newer-format", ["train", "--resume", "--out", "{run_newer}"], "newer"),
    ("resume-binary-config", ["train", "--resume", "--out", "{run_binary_config}"],
     "not valid json"),
    ("resume-mismatched-config", ["train", "--resume", "--out", "{run_mismatch}"],
     "do not match"),
    ("resume-cut-weights", ["train", "--resume", "--out", "{run_cut_weights}"],
     "truncated or corrupt"),
    ("resume-bad-state", ["train", "--resume", "--out", "{run_bad_state}"], "training state"),
    ("resume-data-gone", ["train", "--resume", "--out", "{run_data_gone}"], "is not at"),
    ("resume-wrong-tokenizer-data", ["train", "--resume", "--out", "{run_other_data}"],
     "tokenised differently"),
    # sample
    ("sample-not-a-run", ["sample", "{dir}", "--prompt", "Hi"], "config.json does not exist"),
    ("sample-no-model-section", ["sample", "{run_no_model}", "--prompt", "Hi"], "'model'"),
    ("sample-newer-format", ["sample", "{run_newer}", "--prompt", "Hi"], "newer"),
    ("sample-cut-weights", ["sample", "{run_cut_weights}", "--prompt", "Hi"],
     "truncated or corrupt"),
    ("sample-lying-header", ["sample", "{run_header}", "--prompt", "Hi"], "truncated or corrupt"),
    ("sample-mismatched-config", ["sample", "{run_mismatch}", "--prompt", "Hi"], "does not match"),
    ("sample-bad-tokenizer", ["sample", "{run_bad_tok}", "--prompt", "Hi"], "tokenizer"),
    ("sample-wrong-tokenizer", ["sample", "{run_wrong_tok}", "--prompt", "Hi"],
     "another run"),
    ("sample-nan-weights", ["sample", "{run_nan}", "--prompt", "Hi"], "nan"),
    ("sample-no-weights", ["sample", "{run_no_ckpt}", "--prompt", "Hi"], "no model.safetensors"),
    ("sample-temperature", ["sample", "{run}", "--prompt", "Hi", "--temperature", "-1"],
     "temperature"),
    ("sample-num-samples", ["sample", "{run}", "--prompt", "Hi", "--num-samples", "0"],
     "--num-samples"),
    # eval
    ("eval-files-missing", ["eval", "{run}", "--files", "{missing}"], "does not exist"),
    ("eval-files-empty", ["eval", "{run}", "--files", "{empty}"], "empty"),
    ("eval-files-binary", ["eval", "{run}", "--files", "{binary}"], "not utf-8"),
    ("eval-wrong-tokenizer-data", ["eval", "{run}", "--data", "{other_data}"],
     "different tokenizer"),
    ("eval-data-and-files", ["eval", "{run}", "--data", "{data}", "--files", "{valid_txt}"],
     "either --data or --files"),
    ("eval-batch-zero", ["eval", "{run}", "--batch-size", "0"], "batch size"),
    ("eval-trained-data-gone", ["eval", "{run_data_gone}"], "is not at"),
]


@pytest.fixture(scope="module")
def ws(prepared, slice_files, tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("hostile"), prepared, slice_files)


def test_the_table_covers_every_command_with_enough_cases():
    commands = {argv[0] if argv[0] != "data" else "data prepare" for _, argv, _ in CASES}
    assert commands >= {"info", "presets", "plan", "sweep", "data prepare", "train", "sample",
                        "eval"}
    assert len(CASES) >= 25
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


def test_every_hostile_input_is_one_line_and_no_traceback(ws):
    def run(case):
        case_id, argv, needle = case
        args = [a.format(**vars(ws)) for a in argv]
        return case_id, needle, run_cli(*args, env={"TINYLM_HOME": str(ws.root / "home")})

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, CASES))
    failures = []
    for case_id, needle, result in results:
        try:
            assert_clean_failure(result, needle)
            assert "a bug in mlx-tinylm" not in result.stderr  # a specific message, not a crash
        except AssertionError as err:
            failures.append(f"{case_id}: rc={result.returncode} {str(err).splitlines()[0]}\n"
                            f"    stderr: {result.stderr.strip()[-400:]}")
    assert not failures, f"{len(failures)}/{len(CASES)} cases failed:\n" + "\n".join(failures)
