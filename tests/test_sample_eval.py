"""Loading a run folder, streaming samples from it, exact evaluation, and the sample/eval CLI."""

# mlx_tinylm first: it loads OpenBLAS before mlx.core is imported (hence no isort here).
import mlx_tinylm  # noqa: F401, I001
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import DATA, ROOT, assert_clean_failure, run_cli

from mlx_tinylm import checkpoint
from mlx_tinylm.config import ModelConfig
from mlx_tinylm.errors import TinyLMError
from mlx_tinylm.generate import (
    GenerationStats,
    LoadError,
    encode_files,
    evaluate,
    evaluate_run,
    generate,
    load,
)
from mlx_tinylm.model import GPT
from mlx_tinylm.sampling import SamplerConfig
from mlx_tinylm.tokenizer import train_tokenizer


def _documents(n_bytes: int) -> list[str]:
    text = (DATA / "train.txt").read_text(encoding="utf-8")[:n_bytes]
    return [d.strip("\n") for d in text.split("\n<|endoftext|>\n") if d.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared) -> Path:
    """A run folder as training writes it: config.json, model.safetensors, tokenizer.model."""
    root = tmp_path_factory.mktemp("run")
    tok = prepared.tokenizer
    shutil.copy(tok.model_path, root / checkpoint.TOKENIZER)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
                      context_length=64)
    model = GPT(cfg)
    model.init_weights(seed=0)
    checkpoint.write_config(root, {"model": cfg.to_dict()})
    checkpoint.save_arrays(root / checkpoint.WEIGHTS,
                           {k: np.array(v) for k, v in model.named_weights().items()})
    return root


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


# ----- library -------------------------------------------------------------------------------

def test_loaded_model_reproduces_the_saved_logits(run_dir):
    model, tok = load(run_dir)
    saved = GPT(model.config)
    saved.init_weights(seed=0)
    x = mx.array([tok.encode("Once upon a time, there was a cat.")])
    assert np.abs(np.array(model(x)) - np.array(saved(x))).max() < 1e-5


def test_freshly_loaded_model_samples_without_nan(run_dir):
    model, tok = load(run_dir)
    stats = GenerationStats()
    ids = [p.token for p in generate(model, tok, "Once upon a time", 100, seed=0,
                                     stop_at_eos=False, stats=stats)]
    assert stats.generated_tokens == 100 == len(ids)  # non-finite logits would have raised
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_streamed_text_equals_the_full_decode(run_dir):
    model, tok = load(run_dir)
    # A random model picks byte tokens often, so pieces must hold back partial UTF-8 characters.
    hot = SamplerConfig(temperature=1.5, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    for seed in range(3):
        pieces = list(generate(model, tok, "Lily saw a", 120, hot, seed=seed, stop_at_eos=False))
        ids = [p.token for p in pieces if p.token is not None]
        assert "".join(pieces) == tok.decode(ids)


def test_empty_prompt_starts_from_end_of_document(run_dir):
    model, tok = load(run_dir)
    stats = GenerationStats()
    out = list(generate(model, tok, "", 5, SamplerConfig(temperature=0), stats=stats))
    assert stats.prompt_tokens == 1 and len(out) >= 1


def test_the_same_seed_gives_the_same_text(run_dir):
    model, tok = load(run_dir)
    a = "".join(generate(model, tok, "The dog", 40, seed=7))
    b = "".join(generate(model, tok, "The dog", 40, seed=7))
    assert a == b


def test_evaluate_is_exact_over_every_token(run_dir):
    model, tok = load(run_dir)
    ctx = model.config.context_length
    tokens = np.array([tok.eos_id, *tok.encode(" ".join(_documents(6_000)))], dtype=np.uint16)
    assert len(tokens) > 3 * ctx  # several windows and a padded last batch
    got = evaluate(model, tokens, n_bytes=1234, batch_size=2)
    # Independently: every window of `ctx` targets straight through the model, summed in float64.
    total = 0.0
    for start in range(0, len(tokens) - 1, ctx):
        x = tokens[start:start + ctx + 1].astype(np.int32)
        logits = model(mx.array(x[None, :-1]))
        ce = nn.losses.cross_entropy(logits, mx.array(x[None, 1:]), reduction="none")
        total += float(np.array(ce, dtype=np.float64).sum())
    assert got["tokens"] == len(tokens) - 1
    assert got["loss"] == pytest.approx(total / (len(tokens) - 1), rel=1e-5)
    assert got["bpb"] == pytest.approx(total / (math.log(2) * 1234), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]))
    assert got["bytes"] == 1234


def test_encode_files_lays_out_documents_like_a_prepared_split(run_dir, tmp_path):
    _, tok = load(run_dir)
    docs = ["Tom had a red ball.\nHe liked it.", "Sue ate soup. Çà et là! 🙂"]
    marked = tmp_path / "marked.txt"
    marked.write_text("\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n", encoding="utf-8")
    tokens, n_bytes = encode_files(tok, [marked])
    eos = tok.eos_id
    assert list(tokens) == [eos, *tok.encode(docs[0]), eos, *tok.encode(docs[1]), eos]
    assert n_bytes == sum(len(d.encode("utf-8")) for d in docs)

    running = tmp_path / "running.txt"
    running.write_text("One long text.\nWith two lines.\n", encoding="utf-8")
    tokens, n_bytes = encode_files(tok, [running])
    assert tok.decode(tokens) == "One long text.\nWith two lines.\n"  # one document, kept whole
    assert n_bytes == len(running.read_bytes())


def test_load_refuses_weights_that_do_not_match_the_config(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    weights = checkpoint.load_arrays(run / checkpoint.WEIGHTS)
    weights["model.rope.freqs"] = np.zeros(8, np.float32)  # a derived table has no place on disk
    checkpoint.save_arrays(run / checkpoint.WEIGHTS, weights)
    with pytest.raises(LoadError, match="does not match"):
        load(run)


# ----- CLI -----------------------------------------------------------------------------------

def test_cli_sample_streams_text_and_reports_speed_on_stderr(run_dir):
    r = run_cli("sample", str(run_dir), "--prompt", "Once upon a time", "--max-tokens", "20",
               "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    assert "tok/s" in r.stderr and "seed 3" in r.stderr
    again = run_cli("sample", str(run_dir), "--prompt", "Once upon a time", "--max-tokens", "20",
                   "--seed", "3")
    assert again.stdout == r.stdout


def test_cli_sample_reads_prompts_from_stdin_and_prints_json_without_stopping(run_dir):
    r = subprocess.run([sys.executable, "-m", "mlx_tinylm", "sample", str(run_dir),
                        "--max-tokens", "8", "--json", "--num-samples", "2", "--seed", "0",
                        "--no-stop"],
                       input="The cat\n\n", capture_output=True, text=True, timeout=180,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["The cat", "The cat", "", ""]
    assert [row["seed"] for row in rows] == [0, 1, 0, 1]
    for row in rows:
        assert row["generated_tokens"] == 8 and row["stop_reason"] == "max_tokens"
        assert row["generation_tok_s"] > 0 and row["prompt_tokens"] >= 1
        assert isinstance(row["text"], str)


def test_cli_eval_prints_exact_metrics_as_json(run_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("\n<|endoftext|>\n".join(_documents(3_000)) + "\n", encoding="utf-8")
    r = run_cli("eval", str(run_dir), "--files", str(text), "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert set(metrics) == {"loss", "ppl", "bpb", "tokens", "bytes"}
    model, tok = load(run_dir)
    tokens, n_bytes = encode_files(tok, [text])
    want = evaluate(model, tokens, n_bytes)
    assert metrics["tokens"] == want["tokens"] and metrics["bytes"] == n_bytes
    assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-6)
    # A random model's loss is close to ln(vocab).
    assert abs(metrics["loss"] - math.log(tok.vocab_size)) < 0.5


def _damage(run: Path, how: str) -> None:
    if how == "no weights":
        (run / checkpoint.WEIGHTS).unlink()
    elif how == "no tokenizer":
        (run / checkpoint.TOKENIZER).unlink()
    elif how == "truncated weights":
        data = (run / checkpoint.WEIGHTS).read_bytes()
        (run / checkpoint.WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "garbage weights":
        (run / checkpoint.WEIGHTS).write_bytes(b"\x00not a safetensors file")
    elif how == "foreign tokenizer":
        train_tokenizer(_documents(20_000), 400, run / checkpoint.TOKENIZER)
    elif how == "config mismatch":
        cfg = json.loads((run / checkpoint.CONFIG).read_text())
        cfg["model"]["d_model"] = 64
        (run / checkpoint.CONFIG).write_text(json.dumps(cfg))


BROKEN = ["missing folder", "no weights", "no tokenizer", "truncated weights", "garbage weights",
          "config mismatch", "foreign tokenizer"]


def broken_run(run_dir: Path, tmp_path: Path, how: str) -> Path:
    if how == "missing folder":
        return tmp_path / "nowhere"
    run = copy_run(run_dir, tmp_path)
    _damage(run, how)
    return run


@pytest.mark.parametrize("how", BROKEN)
def test_load_refuses_a_broken_run_folder_with_a_one_line_reason(run_dir, tmp_path, how):
    with pytest.raises(LoadError) as err:
        load(broken_run(run_dir, tmp_path, how))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["missing folder", "no tokenizer", "truncated weights",
                                 "config mismatch"])
def test_cli_refuses_a_broken_run_folder_in_one_line(run_dir, tmp_path, how):
    run = broken_run(run_dir, tmp_path, how)
    commands = [["sample", str(run), "--prompt", "Hi"]]
    if how in ("missing folder", "truncated weights"):
        commands.append(["eval", str(run)])
    for command in commands:
        assert_clean_failure(run_cli(*command), "error: ")


@pytest.mark.parametrize("flags, word", [
    (["--max-tokens", "0"], "max-tokens"),
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--top-k", "-1"], "top-k"),
    (["--repetition-penalty", "0"], "repetition penalty"),
])
def test_cli_refuses_bad_sampling_flags_in_one_line(run_dir, flags, word):
    assert_clean_failure(run_cli("sample", str(run_dir), "--prompt", "Hi", *flags), word)


def test_eval_of_a_prepared_folder_covers_its_validation_split(run_dir, prepared, tmp_path):
    got = evaluate_run(run_dir, data=prepared.path)
    assert got["tokens"] == prepared.n_tokens("val") - 1
    assert got["bytes"] == prepared.n_bytes("val")
    # Without --data or --files: the data folder the run's config.json names.
    trained = copy_run(run_dir, tmp_path / "trained")
    cfg = json.loads((trained / checkpoint.CONFIG).read_text())
    cfg["data"] = {"path": str(prepared.path)}
    (trained / checkpoint.CONFIG).write_text(json.dumps(cfg))
    assert evaluate_run(trained) == got
    # The same folder evaluated by a run with another tokenizer would be meaningless: refused.
    other = copy_run(run_dir, tmp_path)
    text = (DATA / "train_more.txt").read_text(encoding="utf-8")[:200_000]
    train_tokenizer(text.split("\n<|endoftext|>\n"), 512, other / checkpoint.TOKENIZER)
    with pytest.raises(TinyLMError, match="different tokenizer"):
        evaluate_run(other, data=prepared.path)
