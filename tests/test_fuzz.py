"""Fuzzing: the tokenizer round-trips any text, config loading and checkpoint loading turn any
bytes into a config, a checkpoint or one clear error (never another exception, a crash or a hang).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mlx_tinylm  # noqa: F401  (sets up BLAS before MLX)
from mlx_tinylm import checkpoint
from mlx_tinylm import train as training
from mlx_tinylm.config import ConfigError, ModelConfig
from mlx_tinylm.errors import TinyLMError
from mlx_tinylm.tokenizer import StreamingDecoder

# Modest by default for CI; TINYLM_FUZZ_EXAMPLES=5000 digs deeper.
FUZZ = settings(max_examples=int(os.environ.get("TINYLM_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# ----- tokenizer ---------------------------------------------------------------------------------

# Text that stresses a BPE tokenizer: story words, the separator and sentencepiece's own space
# marker spelled literally, control characters, whitespace runs, emoji and combining marks, and
# anything else Unicode allows in UTF-8.
PIECES = st.one_of(
    st.sampled_from(["Once", " upon", " a", " time", ",", ".", "\n", "\n\n", "  ", "\t", "\r\n",
                     "<|endoftext|>", "\n<|endoftext|>\n", "\u2581", "\u2581\u2581", "\x00",
                     "\ufeff", "e\u0301", "\U0001f600", "\u200d", "日本語", "ß", "\x7f"]),
    st.text(min_size=1, max_size=8),
    st.characters(),
)
TEXTS = st.lists(PIECES, max_size=40).map("".join)


@given(text=TEXTS)
@FUZZ
def test_tokenizer_round_trips_any_unicode_text_and_streams_it_exactly(prepared, text):
    tok = prepared.tokenizer
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    decoder = StreamingDecoder(tok)
    assert "".join(decoder.add(i) for i in ids) + decoder.flush() == text


# ----- config JSON -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = list(ModelConfig.__dataclass_fields__)
# Objects with the real field names holding anything, plus now and then an unknown name.
CONFIG_OBJECTS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6),
                                 st.one_of(JSON, st.integers(-4, 600), st.sampled_from(
                                     ["swiglu", "relu2", True, 0.5, 1e308, -0.0])),
                                 max_size=len(FIELDS))


@given(data=st.one_of(CONFIG_OBJECTS, JSON))
@example(data={"mlp_hidden": True})
@example(data={"d_model": 64.0, "n_heads": 4})
@FUZZ
def test_model_config_from_json_is_a_config_or_a_config_error(data):
    text = json.dumps(data)
    try:
        cfg = ModelConfig.from_json(text)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert ModelConfig.from_json(cfg.to_json()) == cfg  # what loads, saves and loads the same
    assert cfg.n_params > 0


@given(text=st.text(max_size=200) | st.sampled_from(["[" * 5000, '{"a":' * 5000, "NaN",
                                                      "1e999", '{"d_model": 1e999}', "\ufeff{}"]))
@FUZZ
def test_model_config_from_any_text_is_a_config_or_a_config_error(text):
    try:
        ModelConfig.from_json(text)
    except ConfigError as err:
        assert "\n" not in str(err)


@given(sections=st.dictionaries(st.sampled_from(["model", "optim", "train", "engine", "data",
                                                 "format_version"]), JSON | CONFIG_OBJECTS))
@example(sections={"optim": {"\n": None}})  # once printed the key's line break into the message
@FUZZ
def test_resuming_from_a_config_json_holding_anything_is_a_one_line_error(prepared, tmp_path,
                                                                         sections):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True, exist_ok=True)
    (run / "checkpoint" / checkpoint.STATE).write_text("{}")
    good = {"model": ModelConfig(vocab_size=prepared.vocab_size).to_dict(),
            "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                      "grad_clip": 1.0},
            "train": {"steps": 3}, "engine": "mlx", "data": {"path": str(prepared.path)}}
    (run / checkpoint.CONFIG).write_text(json.dumps({**good, **sections}))
    try:
        spec, _ = training.resume_spec(run)
    except TinyLMError as err:
        assert "\n" not in str(err)
        return
    assert spec.model.vocab_size == prepared.vocab_size


# ----- checkpoint bytes --------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, context_length=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, dict[str, np.ndarray]]:
    """The bytes of a real weights file, and the weights."""
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in CFG.param_shapes().items()}
    path = tmp_path_factory.mktemp("saved") / "w.safetensors"
    checkpoint.save_arrays(path, weights)
    return path.read_bytes(), weights


def load_or_error(path: Path) -> dict[str, np.ndarray] | None:
    """What a user gets from a weights file: arrays that match the config, or one clear error."""
    try:
        weights = checkpoint.load_arrays(path)
        checkpoint.check_weights(weights, CFG.param_shapes(), path)
    except checkpoint.CheckpointError as err:
        assert "\n" not in str(err)
        return None
    return weights


@given(data=st.binary(max_size=3000))
@example(data=b"")
@example(data=struct.pack("<Q", 2**64 - 1))
@example(data=struct.pack("<Q", 2**40) + b"{}")
@FUZZ
def test_random_bytes_are_not_a_checkpoint(tmp_path, data):
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    assert load_or_error(path) is None


@given(cut=st.integers(min_value=0))
@FUZZ
def test_every_truncation_of_a_checkpoint_is_a_clear_error(saved, tmp_path, cut):
    data, _ = saved
    path = tmp_path / "w.safetensors"
    path.write_bytes(data[:cut % len(data)])
    assert load_or_error(path) is None


@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1,
                      max_size=8))
@FUZZ
def test_corrupted_bytes_load_as_the_same_shapes_or_a_clear_error(saved, tmp_path, edits):
    data, weights = saved
    corrupt = bytearray(data)
    for pos, value in edits:
        corrupt[pos % len(corrupt)] = value
    path = tmp_path / "w.safetensors"
    path.write_bytes(bytes(corrupt))
    loaded = load_or_error(path)
    if loaded is not None:  # the header survived: same names and shapes, data may differ
        assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in weights.items()}


HEADERS = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "U64", "BOOL", "F64", "XX",
                                  ""]) | JSON,
        "shape": st.lists(st.integers(-2, 2**33) | st.sampled_from([2**32, 2**62, 2**64 - 1]),
                          max_size=4) | JSON,
        "data_offsets": st.lists(st.integers(-8, 2**40), min_size=0, max_size=3) | JSON,
    }) | JSON,
    max_size=3)


@given(header=HEADERS, body=st.binary(max_size=256))
@FUZZ
def test_a_lying_safetensors_header_is_a_clear_error_not_a_crash(tmp_path, header, body):
    head = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)
    assert load_or_error(path) is None  # never matches CFG, and never crashes the process


@given(state=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
@FUZZ
def test_a_damaged_state_json_is_a_clear_error(saved, tmp_path, state):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True, exist_ok=True)
    data, _ = saved
    for name in (checkpoint.WEIGHTS, checkpoint.OPTIMIZER):
        (run / "checkpoint" / name).write_bytes(data)
    (run / "checkpoint" / checkpoint.STATE).write_bytes(state)
    try:
        _, _, loaded = checkpoint.load_checkpoint(run)
        training._loop_state(loaded, run)
    except checkpoint.CheckpointError as err:
        assert "\n" not in str(err)
