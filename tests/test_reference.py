"""The NumPy reference on its own: its backward pass, causality, initialisation and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import VARIANTS, batch, fd_config, small_config, wide_weights

from mlx_tinylm import reference as ref
from mlx_tinylm.config import ModelConfig, OptimConfig


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_matches_central_differences_for_every_weight(variant: str) -> None:
    cfg = fd_config(variant)
    model = ref.GPT(cfg, wide_weights(cfg, seed=1, dtype=np.float64), dtype=np.float64)
    inputs, targets = batch(cfg, seed=2)
    _, grads = model.loss_and_grads(inputs, targets)
    assert set(grads) == set(cfg.param_shapes())

    h = 1e-5
    for name, weight in model.weights.items():
        numeric = np.zeros_like(weight)
        flat, out = weight.reshape(-1), numeric.reshape(-1)
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + h
            up = ref.loss_fn(model, inputs, targets)
            flat[i] = saved - h
            down = ref.loss_fn(model, inputs, targets)
            flat[i] = saved
            out[i] = (up - down) / (2 * h)
        assert grads[name].dtype == np.float64
        err = relative_error(grads[name], numeric)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_changing_a_later_token_never_changes_earlier_logits(dtype) -> None:
    cfg = small_config("swiglu-tied")
    model = ref.GPT(cfg, wide_weights(cfg, seed=3), dtype=dtype)
    inputs, _ = batch(cfg, seed=4)
    base = model.forward(inputs)
    for t in (1, cfg.context_length // 2, cfg.context_length - 1):
        changed = inputs.copy()
        changed[:, t:] = (changed[:, t:] + 1) % cfg.vocab_size
        logits = model.forward(changed)
        np.testing.assert_allclose(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert np.abs(logits[:, t] - base[:, t]).max() > 1e-2  # the change is seen where it is


def test_float32_and_float64_give_the_same_model() -> None:
    cfg = small_config("relu2-untied")
    weights = wide_weights(cfg, seed=5)
    inputs, targets = batch(cfg, seed=6)
    loss32, grads32 = ref.GPT(cfg, weights, dtype=np.float32).loss_and_grads(inputs, targets)
    loss64, grads64 = ref.GPT(cfg, weights, dtype=np.float64).loss_and_grads(inputs, targets)
    assert abs(loss32 - loss64) < 1e-5
    for name in grads64:
        assert grads32[name].dtype == np.float32  # nothing silently upcasts to float64
        assert relative_error(grads32[name], grads64[name]) < 1e-4, name


def test_initialisation_scales_residual_projections_down_with_depth() -> None:
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, init_std=0.05)
    weights = ref.GPT(cfg, seed=7).weights
    again = ref.GPT(cfg, seed=7).weights
    for name, w in weights.items():
        np.testing.assert_array_equal(w, again[name])  # the seed makes it reproducible
        if w.ndim == 1:
            np.testing.assert_array_equal(w, 1.0)
            continue
        residual = name.endswith(("o_proj.weight", "down_proj.weight"))
        expected = cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std
        assert abs(w.std() / expected - 1) < 0.1, name
        assert abs(w.mean()) < 0.1 * expected, name


def test_clip_grad_norm_scales_to_the_limit_and_reports_the_original_norm() -> None:
    grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    clipped, norm = ref.clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert ref.global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    assert clipped["a"].dtype == np.float32
    same, _ = ref.clip_grad_norm(grads, 10.0)
    np.testing.assert_array_equal(same["a"], grads["a"])


def test_reference_engine_trains() -> None:
    cfg = small_config("swiglu-tied")
    model = ref.GPT(cfg, seed=8)
    opt = ref.AdamW(OptimConfig(lr=1e-2))
    inputs, targets = batch(cfg, seed=9, B=4)
    losses = [ref.train_step(model, opt, inputs, targets, lr=1e-2, grad_clip=1.0)[0]
              for _ in range(40)]
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), abs=0.1)
    assert losses[-1] < 0.5 * losses[0], losses


def test_optimizer_state_dict_resumes_exactly() -> None:
    cfg = small_config("relu2-untied")
    opt_cfg = OptimConfig(lr=3e-3)
    inputs, targets = batch(cfg, seed=10)
    model, opt = ref.GPT(cfg, seed=11), ref.AdamW(opt_cfg)
    for _ in range(2):
        ref.train_step(model, opt, inputs, targets, lr=3e-3, grad_clip=1.0)
    saved_weights, saved_opt = {k: w.copy() for k, w in model.weights.items()}, opt.state_dict()
    assert int(saved_opt["states.0.step"]) == 2
    ref.train_step(model, opt, inputs, targets, lr=1e-3, grad_clip=1.0)

    resumed, resumed_opt = ref.GPT(cfg, saved_weights), ref.AdamW(opt_cfg)
    resumed_opt.load_state_dict(saved_opt)
    ref.train_step(resumed, resumed_opt, inputs, targets, lr=1e-3, grad_clip=1.0)
    for name, w in model.weights.items():
        np.testing.assert_array_equal(resumed.weights[name], w)
