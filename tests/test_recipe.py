"""Recipe options: config validation and names, recipes, the cosine schedule, initialisation
options, Muon, learned positions in generation, and the recipe benchmark end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, fields

import numpy as np
import pytest
from conftest import ROOT, assert_clean_failure, run_cli
from tiny_models import VARIANTS, batch, small_config, wide_weights

import mlx_tinylm  # noqa: F401  (loads OpenBLAS; must precede the first import of mlx.core)

# isort: split
import mlx.core as mx

from mlx_tinylm import model as mlx_model
from mlx_tinylm import reference as ref
from mlx_tinylm import train as training
from mlx_tinylm.config import (
    ARCHITECTURE_FIELDS,
    RECIPES,
    SCHEDULE_FIELDS,
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    preset,
    recipe,
)
from mlx_tinylm.engine import MlxEngine, make_engine
from mlx_tinylm.errors import TinyLMError
from mlx_tinylm.generate import NextTokenLogits
from mlx_tinylm.schedule import Schedule

# ----- config ----------------------------------------------------------------------------------

ALL_OPTIONS = dict(position="learned", norm="layernorm", mlp="gelu", qk_norm=True,
                   tie_embeddings=False, zero_init_residual=True)


def test_every_option_survives_a_json_round_trip() -> None:
    cfg = ModelConfig(d_model=64, n_heads=4, **ALL_OPTIONS)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    for name, value in ALL_OPTIONS.items():
        assert getattr(again, name) == value


@pytest.mark.parametrize("change, message", [
    (dict(position="alibi"), "position must be one of rope, learned"),
    (dict(norm="batchnorm"), "norm must be one of rmsnorm, layernorm"),
    (dict(mlp="tanh"), "mlp must be one of swiglu, relu2, gelu"),
    (dict(qk_norm="yes"), "qk_norm must be true or false"),
    (dict(zero_init_residual=1), "zero_init_residual must be true or false"),
    (dict(d_model=30, n_heads=6), "must be even for RoPE"),
])
def test_bad_options_are_refused_by_name(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**change)


def test_odd_head_dimension_is_fine_without_rope() -> None:
    assert ModelConfig(d_model=30, n_heads=6, position="learned").head_dim == 5


def test_options_add_exactly_their_parameters_with_stable_names() -> None:
    base = ModelConfig(d_model=64, n_heads=4, n_layers=2, context_length=128)
    learned = base.with_(position="learned").param_shapes()
    assert set(learned) - set(base.param_shapes()) == {"model.embed_positions.weight"}
    assert learned["model.embed_positions.weight"] == (128, 64)

    qk = base.with_(qk_norm=True).param_shapes()
    added = set(qk) - set(base.param_shapes())
    assert added == {f"model.layers.{i}.self_attn.{n}_norm.weight" for i in range(2)
                     for n in "qk"}
    assert all(qk[name] == (16,) for name in added)  # one gain per head dimension (Qwen3)

    # LayerNorm reuses the RMSNorm names (a gain each); GELU the ReLU² matrices.
    assert base.with_(norm="layernorm").param_shapes() == base.param_shapes()
    assert base.with_(mlp="gelu").param_shapes() == base.with_(mlp="relu2").param_shapes()


def test_position_table_counts_as_embedding_and_costs_no_flops() -> None:
    base = ModelConfig(d_model=64, n_heads=4, context_length=128)
    learned = base.with_(position="learned")
    assert learned.n_params == base.n_params + 128 * 64
    assert learned.n_embedding_params == base.n_embedding_params + 128 * 64
    assert learned.n_non_embedding_params == base.n_non_embedding_params
    assert learned.flops_per_token() == base.flops_per_token()


def test_bad_optimizer_settings_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, muon"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="Muon learning rate"):
        OptimConfig(optimizer="muon", muon_lr=0.0)
    with pytest.raises(ConfigError, match="schedule must be one of wsd, cosine"):
        TrainConfig(schedule="linear")


def test_optim_config_reads_back_from_json() -> None:
    opt = OptimConfig(optimizer="muon", muon_lr=0.05, betas=(0.8, 0.99))
    assert OptimConfig.from_dict(json.loads(json.dumps(asdict(opt)))) == opt
    with pytest.raises(ConfigError, match="unknown optimizer config field"):
        OptimConfig.from_dict({"momentum": 0.9})


# ----- recipes -----------------------------------------------------------------------------------

def test_default_recipe_is_what_the_dataclass_defaults_say() -> None:
    default = recipe("default")
    assert ModelConfig().with_(**default.model) == ModelConfig()
    assert default.optim == OptimConfig()
    t = TrainConfig()
    assert {k: getattr(t, k) for k in SCHEDULE_FIELDS} == default.train
    assert set(default.model) == set(ARCHITECTURE_FIELDS)


def test_nanogpt_recipe_is_the_stated_baseline() -> None:
    model, optim, train_cfg = RECIPES["nanogpt"].apply(preset("tiny"), TrainConfig())
    assert (model.position, model.norm, model.mlp, model.tie_embeddings) == (
        "learned", "layernorm", "gelu", True)
    assert not model.qk_norm and not model.zero_init_residual and model.init_std == 0.02
    assert (model.d_model, model.n_layers) == (preset("tiny").d_model, preset("tiny").n_layers)
    assert optim.optimizer == "adamw" and optim.betas == (0.9, 0.95)
    assert optim.weight_decay == 0.1
    assert train_cfg.schedule == "cosine" and train_cfg.final_lr_frac == 0.1


def test_unknown_recipe_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose one of: default, nanogpt"):
        recipe("speedrun")


# ----- schedule ----------------------------------------------------------------------------------

def test_cosine_schedule_warms_up_then_follows_a_half_cosine_to_the_final_value() -> None:
    s = Schedule(peak_lr=1e-3, warmup=0.1, final_frac=0.1, shape="cosine")
    assert s(0.05) == pytest.approx(5e-4)
    assert s(0.1) == pytest.approx(1e-3)
    assert s(0.55) == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # halfway down at mid-decay
    assert s.final_lr == pytest.approx(1e-4)
    values = [s(f / 100) for f in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_unknown_schedule_shape_is_refused() -> None:
    with pytest.raises(TinyLMError, match="schedule must be one of"):
        Schedule(peak_lr=1e-3, shape="step")


# ----- initialisation options ---------------------------------------------------------------------

def test_zero_init_residual_zeroes_exactly_the_residual_projections_in_both_engines() -> None:
    cfg = ModelConfig(vocab_size=128, d_model=32, n_heads=2, n_layers=2, qk_norm=True,
                      position="learned", zero_init_residual=True)
    mlx_gpt = mlx_model.GPT(cfg)
    mlx_gpt.init_weights(seed=1)
    for weights in ({k: np.array(v) for k, v in mlx_gpt.named_weights().items()},
                    ref.GPT(cfg, seed=1).weights):
        for name, w in weights.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                assert not w.any(), name
            elif w.ndim == 1:
                np.testing.assert_array_equal(w, 1.0)  # norm gains, QK-norm gains included
            else:
                assert abs(w.std() / cfg.init_std - 1) < 0.15, name  # position table too


def test_zero_init_residual_blocks_start_as_the_identity() -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=3, zero_init_residual=True,
                      tie_embeddings=False)
    model = ref.GPT(cfg, seed=2)
    inputs, _ = batch(cfg, seed=3, T=8)
    h, _ = model.model.forward(model.weights, inputs)
    embed = model.weights["model.embed_tokens.weight"][inputs]
    final, _ = model.model.norm.forward(model.weights, embed)
    np.testing.assert_allclose(h, final, atol=1e-6)


# ----- Muon ---------------------------------------------------------------------------------------

def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    cfg = small_config("relu2-untied").with_(position="learned", qk_norm=True)
    opt = mlx_model.make_optimizer(OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.05))
    model = mlx_model.GPT(cfg)
    opt.init(model.trainable_parameters())
    from mlx.utils import tree_flatten

    groups = [{k.rsplit(".", 1)[0] for k, _ in tree_flatten(o.state) if k.endswith((".v", ".m"))}
              for o in opt.optimizers]
    muon, decayed, plain = groups
    assert muon == {n for n, s in cfg.param_shapes().items()
                    if n.startswith("model.layers.") and len(s) == 2}
    assert decayed == {"model.embed_tokens.weight", "model.embed_positions.weight",
                       "lm_head.weight"}
    assert all(len(cfg.param_shapes()[n]) == 1 for n in plain) and plain
    # The schedule's rate scales both peaks alike.
    opt.learning_rate = 5e-4
    assert opt.optimizers[0].learning_rate.item() == pytest.approx(0.025)
    assert opt.optimizers[1].learning_rate.item() == pytest.approx(5e-4)
    assert opt.learning_rate.item() == pytest.approx(5e-4)


def test_muon_step_applies_an_orthogonalised_update_to_hidden_matrices() -> None:
    cfg = small_config("swiglu-tied")
    weights = wide_weights(cfg, seed=4)
    muon_lr = 0.02
    opt_cfg = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=muon_lr, grad_clip=0.0,
                          weight_decay=0.0)
    engine = MlxEngine(cfg, opt_cfg, seed=0, weights=weights)
    inputs, targets = batch(cfg, seed=5, B=8)
    engine.step(inputs, targets, opt_cfg.lr)
    after = engine.weights()
    name = "model.layers.0.self_attn.q_proj.weight"  # square: no shape factor
    update = np.linalg.svd((weights[name] - after[name]) / muon_lr, compute_uv=False)
    _, grads = ref.GPT(cfg, weights).loss_and_grads(inputs, targets)
    gradient = np.linalg.svd(grads[name], compute_uv=False)
    # The first step's direction is the gradient's; Newton–Schulz (5 steps) pulls its leading
    # singular values, spread over a factor of several, to about 1.
    top = slice(0, 8)
    assert gradient[top].max() / gradient[top].min() > 2, gradient
    assert 0.6 < update[top].min() and update[top].max() < 1.3, update
    # AdamW's first bias-corrected step moves each embedding entry with a gradient by ~lr.
    moved = np.abs(after["model.embed_tokens.weight"] - weights["model.embed_tokens.weight"])
    assert moved.max() == pytest.approx(1e-3, rel=0.05)


def test_muon_run_resumes_exactly_from_its_saved_state() -> None:
    cfg = small_config("relu2-untied")
    opt_cfg = OptimConfig(optimizer="muon", lr=3e-3, muon_lr=0.03)
    first = MlxEngine(cfg, opt_cfg, seed=6)
    for i in range(2):
        first.step(*batch(cfg, seed=10 + i), 3e-3)
    second = MlxEngine(cfg, opt_cfg, seed=99, weights=first.weights(),
                       optimizer=first.optimizer_state())
    for engine in (first, second):
        engine.step(*batch(cfg, seed=20), 2e-3)
    for name, w in first.weights().items():
        np.testing.assert_allclose(second.weights()[name], w, rtol=0, atol=1e-6, err_msg=name)


def test_muon_trains_a_small_model() -> None:
    cfg = small_config("swiglu-tied")
    engine = MlxEngine(cfg, OptimConfig(optimizer="muon", lr=1e-2, muon_lr=0.05), seed=7)
    inputs, targets = batch(cfg, seed=8, B=4)
    losses = [engine.step(inputs, targets, 1e-2)[0] for _ in range(30)]
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), abs=0.1)
    assert losses[-1] < 0.5 * losses[0], losses


def test_numpy_engine_refuses_muon_with_a_clear_error(prepared, tmp_path) -> None:
    cfg = small_config("swiglu-tied")
    with pytest.raises(TinyLMError, match="NumPy engine implements AdamW only"):
        make_engine("numpy", cfg, OptimConfig(optimizer="muon"))
    with pytest.raises(TinyLMError, match="use --engine mlx"):
        training.build_spec(prepared, preset="nano", overrides={},
                            optim=OptimConfig(optimizer="muon"),
                            train_cfg=TrainConfig(engine="numpy"), out=tmp_path / "run")
    # 'auto' never picks an engine that cannot run the optimizer.
    spec = training.build_spec(prepared, preset="nano", overrides={},
                               optim=OptimConfig(optimizer="muon"),
                               train_cfg=TrainConfig(engine="auto"), out=tmp_path / "run")
    assert spec.engine == "mlx"


# ----- learned positions in generation ------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_recompute_for_every_variant(variant: str) -> None:
    # Learned positions are looked up at the cache offset; a wrong offset changes the logits.
    cfg = small_config(variant)
    model = mlx_model.GPT(cfg)
    model.load_named_weights({k: mx.array(w) for k, w in wide_weights(cfg, seed=9).items()})
    tokens = np.random.default_rng(10).integers(0, cfg.vocab_size, 3 * cfg.context_length)
    cached, recompute = NextTokenLogits(model), NextTokenLogits(model, use_cache=False)
    for n in range(3, len(tokens) + 1):
        a, b = np.array(cached(tokens[:n].tolist())), np.array(recompute(tokens[:n].tolist()))
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() < 1e-4, n


# ----- the recipe benchmark -----------------------------------------------------------------------

def test_recipe_benchmark_runs_variants_and_seeds_and_writes_the_table(slice_files, tmp_path):
    train, valid = slice_files
    out = tmp_path / "recipe.json"
    cmd = [sys.executable, "benchmarks/recipe.py", "--variants", "nanogpt",
           "default:optimizer=muon,mlp=relu2", "--seeds", "0", "1", "--tokens", "2048",
           "--set", "d_model=32", "n_layers=2", "n_heads=2", "context_length=32",
           "batch_size=8", "vocab_size=512", "--files", str(train), "--val-files", str(valid),
           "--json", str(out)]
    env = {"TINYLM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("nanogpt", "default:optimizer=muon,mlp=relu2") for s in (0, 1))
    for r in runs:
        assert r["tokens"] >= 2048 and 0 < r["val_bpb"] < 10
        assert r["model"]["d_model"] == 32 and r["model"]["vocab_size"] == 512
    nano = [r for r in runs if r["variant"] == "nanogpt"]
    assert nano[0]["model"]["position"] == "learned" and nano[0]["train"]["schedule"] == "cosine"
    assert nano[0]["val_bpb"] != nano[1]["val_bpb"]  # the seeds really differ
    muon = [r for r in runs if r["variant"] != "nanogpt"]
    assert muon[0]["optim"]["optimizer"] == "muon" and muon[0]["model"]["mlp"] == "relu2"
    assert "| `nanogpt` | 2 |" in done.stdout and "Δ vs first" in done.stdout


def test_recipe_benchmark_refuses_a_bad_variant_before_training(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/recipe.py", "--variants",
                           "default:mlp=tanh", "--tokens", "1000", "--json",
                           str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "mlp must be one of" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_every_model_field_but_the_vocabulary_is_an_architecture_or_size_field() -> None:
    # The benchmark routes keys by field name; a new field must land somewhere on purpose.
    size = {"vocab_size", "d_model", "n_layers", "n_heads", "context_length", "rope_base",
            "norm_eps"}
    assert {f.name for f in fields(ModelConfig)} == size | set(ARCHITECTURE_FIELDS)


# ----- tinylm train --recipe --------------------------------------------------------------------

TINY_FLAGS = ["--d-model", "32", "--layers", "2", "--heads", "2", "--context", "32",
              "--batch-size", "8", "--no-dashboard", "--engine", "mlx"]


def test_train_recipe_flag_records_the_recipe_and_flags_still_override_it(prepared, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--data", str(prepared.path), "--steps", "3", *TINY_FLAGS,
                     "--recipe", "nanogpt", "--mlp", "relu2", "--out", str(run))
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["position"] == "learned" and config["model"]["norm"] == "layernorm"
    assert config["model"]["mlp"] == "relu2"  # the flag wins over the recipe
    assert config["train"]["schedule"] == "cosine" and config["optim"]["betas"] == [0.9, 0.95]


def test_train_with_an_unknown_recipe_fails_in_one_line(prepared, tmp_path):
    result = run_cli("train", "--data", str(prepared.path), "--steps", "3", *TINY_FLAGS,
                     "--recipe", "speedrun", "--out", str(tmp_path / "run"))
    assert_clean_failure(result, "unknown recipe")
