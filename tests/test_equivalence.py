"""The MLX model equals the NumPy reference: logits, gradients, compiled AdamW steps.

Also the facts both engines must share: causality, parameter counts, initialisation, and the
OpenBLAS set-up that makes MLX usable on Linux CPUs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import VARIANTS, batch, small_config, wide_weights

import mlx_tinylm  # noqa: F401  (loads OpenBLAS; must precede the first import of mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_tinylm import device
from mlx_tinylm import model as mlx_model
from mlx_tinylm import reference as ref
from mlx_tinylm.config import PRESETS, ModelConfig, OptimConfig

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_SETS = ("init", "wide")  # the stated initialisation; order-one activations


def weights_for(cfg: ModelConfig, kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    # The stated init keeps the residual stream small, so the norm eps matters; the wide
    # weights make attention far from uniform, so RoPE and the scale matter.
    return ref.GPT(cfg, seed=seed).weights if kind == "init" else wide_weights(cfg, seed)


def build_mlx(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> mlx_model.GPT:
    model = mlx_model.GPT(cfg)
    model.load_named_weights({k: mx.array(w) for k, w in weights.items()})
    mx.eval(model.parameters())
    return model


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


@pytest.mark.parametrize("kind", WEIGHT_SETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mlx_logits_equal_numpy_logits(variant: str, kind: str) -> None:
    cfg = small_config(variant)
    weights = weights_for(cfg, kind)
    inputs, _ = batch(cfg, seed=1)
    expected = ref.GPT(cfg, weights).forward(inputs)
    got = np.array(build_mlx(cfg, weights)(mx.array(inputs)))
    err = np.abs(got - expected).max()
    assert err < 1e-4
    # Relative to the logits' size too: the stated init gives logits of only ~0.1.
    assert err < 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("kind", WEIGHT_SETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mlx_gradients_equal_numpy_gradients(variant: str, kind: str) -> None:
    cfg = small_config(variant)
    weights = weights_for(cfg, kind)
    inputs, targets = batch(cfg, seed=2)
    np_loss, np_grads = ref.GPT(cfg, weights).loss_and_grads(inputs, targets)
    model = build_mlx(cfg, weights)
    loss, grads = nn.value_and_grad(model, mlx_model.loss_fn)(model, mx.array(inputs),
                                                              mx.array(targets))
    grads = {k: np.array(g) for k, g in tree_flatten(grads)}
    assert set(grads) == set(np_grads) == set(cfg.param_shapes())
    assert loss.item() == pytest.approx(np_loss, rel=1e-5)
    for name, g in np_grads.items():
        err = relative_error(grads[name], g)
        assert err < 1e-3, f"{name}: relative error {err:.2e}"


STEP_CASES = {
    # variant, weights, grad_clip: clipping active (asserted below), weights of order one
    "swiglu-tied-clipped": ("swiglu-tied", "wide", 0.5),
    # no clipping: the step's own norm path; the stated initialisation
    "relu2-untied-unclipped": ("relu2-untied", "init", 0.0),
}


@pytest.mark.parametrize("case", STEP_CASES)
def test_compiled_mlx_steps_equal_numpy_adamw_steps(case: str) -> None:
    variant, kind, clip = STEP_CASES[case]
    cfg = small_config(variant)
    weights = weights_for(cfg, kind)
    # With eps 1e-8, a gradient entry that is ~0 up to float32 noise gets an update anywhere in
    # [-lr, lr] (measured: engines 1.4·lr apart). eps 1e-4 is still far below typical |g| here,
    # and it makes where eps enters the denominator visible.
    opt_cfg = OptimConfig(lr=1e-2, eps=1e-4, weight_decay=0.5, grad_clip=clip)
    mlx_gpt = build_mlx(cfg, weights)
    mlx_opt = mlx_model.make_optimizer(opt_cfg)
    step = mlx_model.make_train_step(mlx_gpt, mlx_opt, opt_cfg.grad_clip)
    np_gpt, np_opt = ref.GPT(cfg, weights), ref.AdamW(opt_cfg)

    for i, lr in enumerate((opt_cfg.lr, opt_cfg.lr / 2)):  # two steps: bias correction at t=2
        inputs, targets = batch(cfg, seed=10 + i)
        mlx_opt.learning_rate = lr
        loss, norm = step(mx.array(inputs), mx.array(targets))
        mx.eval(loss, norm, mlx_gpt.state, mlx_opt.state)
        before = {k: w.copy() for k, w in np_gpt.weights.items()}
        np_loss, np_norm = ref.train_step(np_gpt, np_opt, inputs, targets, lr, opt_cfg.grad_clip)
        assert loss.item() == pytest.approx(np_loss, rel=1e-5)
        assert norm.item() == pytest.approx(np_norm, rel=1e-4)
        if clip:
            assert np_norm > 2 * clip  # clipping really acted
        new = {k: np.array(w) for k, w in mlx_gpt.named_weights().items()}
        for name, w in np_gpt.weights.items():
            # Every weight moved by about lr; the engines agree to a small fraction of that.
            assert np.abs(w - before[name]).max() > 0.1 * lr, name
            err = np.abs(new[name] - w).max()
            assert err < 2e-3 * lr, f"step {i + 1} {name}: max abs difference {err:.2e}"

    # The optimizer states match name for name, so checkpoints move between the engines.
    mlx_state = {k: np.array(v) for k, v in tree_flatten(mlx_opt.state)}
    np_state = np_opt.state_dict()
    assert set(mlx_state) == set(np_state)
    for key, value in np_state.items():
        np.testing.assert_allclose(mlx_state[key], value, rtol=1e-3, atol=1e-7, err_msg=key)


def test_numpy_optimizer_resumes_from_mlx_optimizer_state() -> None:
    cfg = small_config("swiglu-tied")
    opt_cfg = OptimConfig(lr=1e-2, eps=1e-4)
    mlx_gpt = build_mlx(cfg, wide_weights(cfg, 0))
    mlx_opt = mlx_model.make_optimizer(opt_cfg)
    step = mlx_model.make_train_step(mlx_gpt, mlx_opt, opt_cfg.grad_clip)
    for i in range(3):
        inputs, targets = batch(cfg, seed=20 + i)
        mx.eval(step(mx.array(inputs), mx.array(targets)), mlx_gpt.state, mlx_opt.state)
        if i == 1:
            np_gpt = ref.GPT(cfg, {k: np.array(w) for k, w in mlx_gpt.named_weights().items()})
            np_opt = ref.AdamW(opt_cfg)
            np_opt.load_state_dict({k: np.array(v) for k, v in tree_flatten(mlx_opt.state)})
    ref.train_step(np_gpt, np_opt, inputs, targets, opt_cfg.lr, opt_cfg.grad_clip)
    assert np_opt.step == 3
    for name, w in mlx_gpt.named_weights().items():
        assert np.abs(np.array(w) - np_gpt.weights[name]).max() < 2e-3 * opt_cfg.lr, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_later_token_never_changes_earlier_mlx_logits(variant: str) -> None:
    cfg = small_config(variant)
    model = build_mlx(cfg, wide_weights(cfg, seed=3))
    inputs, _ = batch(cfg, seed=4)
    base = np.array(model(mx.array(inputs)))
    for t in (1, cfg.context_length // 2, cfg.context_length - 1):
        changed = inputs.copy()
        changed[:, t:] = (changed[:, t:] + 1) % cfg.vocab_size
        logits = np.array(model(mx.array(changed)))
        np.testing.assert_allclose(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert np.abs(logits[:, t] - base[:, t]).max() > 1e-2  # the change is seen where it is


PRESET_VARIANTS = {**PRESETS,
                   "nano-relu2-untied": PRESETS["nano"].with_(mlp="relu2", tie_embeddings=False),
                   "nano-every-option": PRESETS["nano"].with_(
                       mlp="gelu", position="learned", norm="layernorm", qk_norm=True,
                       tie_embeddings=False, zero_init_residual=True)}


@pytest.mark.parametrize("name", PRESET_VARIANTS)
def test_parameter_count_from_config_equals_built_models(name: str) -> None:
    cfg = PRESET_VARIANTS[name]
    expected = cfg.param_shapes()
    mlx_shapes = {k: tuple(w.shape) for k, w in mlx_model.GPT(cfg).named_weights().items()}
    np_shapes = {k: w.shape for k, w in ref.GPT(cfg).weights.items()}
    assert mlx_shapes == expected
    assert np_shapes == expected
    assert sum(math.prod(s) for s in mlx_shapes.values()) == cfg.n_params
    assert sum(math.prod(s) for s in np_shapes.values()) == cfg.n_params


def test_mlx_initialisation_scales_residual_projections_down_with_depth() -> None:
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, init_std=0.05)
    model = mlx_model.GPT(cfg)
    model.init_weights(seed=7)
    for name, w in model.named_weights().items():
        w = np.array(w)
        if w.ndim == 1:
            np.testing.assert_array_equal(w, 1.0)
            continue
        residual = name.endswith(("o_proj.weight", "down_proj.weight"))
        expected = cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std
        assert abs(w.std() / expected - 1) < 0.1, name
        assert abs(w.mean()) < 0.1 * expected, name


def _openblas() -> str | None:
    found = [p for p in device.OPENBLAS_CANDIDATES if os.path.exists(p)]
    return os.path.realpath(found[0]) if found else None


def _mapped_blas(env_blas: str | None) -> list[str]:
    """BLAS libraries mapped in a fresh process that imported mlx_tinylm, then ran an MLX matmul."""
    code = ("import json, mlx_tinylm, mlx.core as mx; from mlx_tinylm import device; "
            "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); "
            "print(json.dumps(device.loaded_blas_libraries()))")
    env = {k: v for k, v in os.environ.items() if k != "TINYLM_BLAS"}
    if env_blas is not None:
        env["TINYLM_BLAS"] = env_blas
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return [os.path.realpath(p) for p in json.loads(out.stdout.strip().splitlines()[-1])]


@pytest.mark.skipif(not sys.platform.startswith("linux") or _openblas() is None,
                    reason="OpenBLAS set-up applies on Linux with libopenblas installed")
def test_importing_mlx_tinylm_maps_openblas_on_linux() -> None:
    assert _openblas() in _mapped_blas(None)
    assert _openblas() not in _mapped_blas("off")  # and the opt-out really opts out
