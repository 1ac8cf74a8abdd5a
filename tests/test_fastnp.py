"""The fast NumPy engine equals the MLX model and the NumPy reference: logits, gradients, steps.

fastnp.py reorders q/k rows, folds the attention scale into RoPE, skips masked attention blocks,
chunks the head and splits the batch across threads; each test below would catch one of those
going wrong. Configs with a context longer than one attention block (128) exercise the blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import VARIANTS as ALL_VARIANTS
from tiny_models import batch, small_config, wide_weights

import mlx_tinylm  # noqa: F401  (loads OpenBLAS; must precede the first import of mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_tinylm import fastnp
from mlx_tinylm import model as mlx_model
from mlx_tinylm import reference as ref
from mlx_tinylm.config import ModelConfig, OptimConfig
from mlx_tinylm.engine import FastNumpyEngine, fast_numpy_supports

# fastnp implements the default architecture; other options train on the reference engine.
VARIANTS = [v for v in ALL_VARIANTS if fast_numpy_supports(small_config(v))]


def long_config(variant: str) -> ModelConfig:
    """Context over two attention blocks (the last one partial), a vocab over one head chunk."""
    return ModelConfig(vocab_size=600, d_model=32, n_layers=2, n_heads=4, context_length=300,
                       **ALL_VARIANTS[variant])


CONFIGS = {"small": small_config, "long": long_config}


def build_mlx(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> mlx_model.GPT:
    model = mlx_model.GPT(cfg)
    model.load_named_weights({k: mx.array(w) for k, w in weights.items()})
    mx.eval(model.parameters())
    return model


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def case(size: str, variant: str, seed: int = 0, B: int = 3, T: int | None = None):
    cfg = CONFIGS[size](variant)
    weights = wide_weights(cfg, seed)
    T = min(cfg.context_length, 260) if T is None else T
    return cfg, weights, batch(cfg, seed=seed + 1, B=B, T=T)


@pytest.mark.parametrize("size", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_logits_equal_mlx_and_reference_logits(variant: str, size: str) -> None:
    cfg, weights, (inputs, _) = case(size, variant)
    got = fastnp.GPT(cfg, weights).logits(inputs)
    want = np.array(build_mlx(cfg, weights)(mx.array(inputs)))
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - ref.GPT(cfg, weights).forward(inputs)).max() < 1e-4


@pytest.mark.parametrize("size", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_gradients_equal_mlx_gradients(variant: str, size: str) -> None:
    cfg, weights, (inputs, targets) = case(size, variant)
    loss, grads = fastnp.GPT(cfg, weights).loss_and_grads(inputs, targets)
    model = build_mlx(cfg, weights)
    mlx_loss, mlx_grads = nn.value_and_grad(model, mlx_model.loss_fn)(
        model, mx.array(inputs), mx.array(targets))
    mlx_grads = {k: np.array(g) for k, g in tree_flatten(mlx_grads)}
    assert set(grads) == set(mlx_grads) == set(cfg.param_shapes())
    assert loss == pytest.approx(mlx_loss.item(), rel=1e-5)
    for name, g in grads.items():
        assert relative_error(g, mlx_grads[name]) < 1e-3, name


def test_fast_gradients_equal_reference_gradients() -> None:
    cfg, weights, (inputs, targets) = case("small", "relu2-untied", seed=3)
    loss, grads = fastnp.GPT(cfg, weights).loss_and_grads(inputs, targets)
    ref_loss, ref_grads = ref.GPT(cfg, weights).loss_and_grads(inputs, targets)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        assert relative_error(grads[name], g) < 1e-3, name


def test_weights_come_back_exactly_as_given() -> None:
    # q/k rows are stored permuted inside; the names and values outside must not change.
    cfg, weights, _ = case("small", "swiglu-tied")
    back = fastnp.GPT(cfg, weights).named_weights()
    assert set(back) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(back[name], w, err_msg=name)


def test_one_thread_and_two_threads_give_the_same_gradients() -> None:
    cfg, weights, (inputs, targets) = case("long", "swiglu-tied", B=4)
    one = fastnp.GPT(cfg, weights, workers=1).loss_and_grads(inputs, targets)
    two = fastnp.GPT(cfg, weights, workers=2).loss_and_grads(inputs, targets)
    assert one[0] == pytest.approx(two[0], rel=1e-6)
    for name, g in one[1].items():
        assert relative_error(g, two[1][name]) < 1e-5, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_adamw_steps_equal_compiled_mlx_steps(variant: str) -> None:
    cfg, weights, _ = case("small", variant)
    # lr and eps as in the MLX/reference step test: large enough updates to compare, and eps
    # that keeps float32-noise gradients from jumping anywhere in [-lr, lr].
    clip = 0.5 if variant == "swiglu-tied" else 0.0
    opt_cfg = OptimConfig(lr=1e-2, eps=1e-4, weight_decay=0.5, grad_clip=clip)
    model = build_mlx(cfg, weights)
    mlx_opt = mlx_model.make_optimizer(opt_cfg)
    mlx_step = mlx_model.make_train_step(model, mlx_opt, opt_cfg.grad_clip)
    fast = fastnp.GPT(cfg, weights)
    fast_opt = fastnp.AdamW(opt_cfg)
    fast_step = fastnp.make_train_step(fast, fast_opt, opt_cfg.grad_clip)
    for i, lr in enumerate((opt_cfg.lr, opt_cfg.lr / 2)):  # two steps: bias correction at t=2
        inputs, targets = batch(cfg, seed=10 + i)
        mlx_opt.learning_rate = lr
        fast_opt.learning_rate = lr
        loss, norm = mlx_step(mx.array(inputs), mx.array(targets))
        mx.eval(loss, norm, model.state, mlx_opt.state)
        before = fast.named_weights()
        fast_loss, fast_norm = fast_step(inputs, targets)
        assert fast_loss == pytest.approx(loss.item(), rel=1e-5)
        assert fast_norm == pytest.approx(norm.item(), rel=1e-4)
        if clip:
            assert fast_norm > 2 * clip  # clipping really acted
        after = fast.named_weights()
        for name, w in model.named_weights().items():
            assert np.abs(after[name] - before[name]).max() > 0.1 * lr, name
            err = np.abs(after[name] - np.array(w)).max()
            assert err < 2e-3 * lr, f"step {i + 1} {name}: max abs difference {err:.2e}"
    # the checkpoint format matches MLX's optimizer state name for name
    mlx_state = {k: np.array(v) for k, v in tree_flatten(mlx_opt.state)}
    fast_state = fastnp.optimizer_state_dict(fast, fast_opt)
    assert set(mlx_state) == set(fast_state)
    for key, value in mlx_state.items():
        np.testing.assert_allclose(fast_state[key], value, rtol=1e-3, atol=1e-7, err_msg=key)


def test_dict_adamw_equals_reference_adamw() -> None:
    cfg, weights, (inputs, targets) = case("small", "relu2-untied")
    opt_cfg = OptimConfig(lr=1e-2, eps=1e-4, weight_decay=0.5)
    _, grads = ref.GPT(cfg, weights).loss_and_grads(inputs, targets)
    grads, norm = fastnp.clip_grad_norm(grads, 0.5)
    ref_grads, ref_norm = ref.clip_grad_norm(ref.GPT(cfg, weights).loss_and_grads(
        inputs, targets)[1], 0.5)
    assert norm == pytest.approx(ref_norm, rel=1e-6)
    ours = {k: v.copy() for k, v in weights.items()}
    theirs = {k: v.copy() for k, v in weights.items()}
    fast_opt, ref_opt = fastnp.AdamW(opt_cfg), ref.AdamW(opt_cfg)
    for lr in (1e-2, 5e-3):
        fast_opt.update(ours, grads, lr)
        ref_opt.update(theirs, ref_grads, lr)
    for name in weights:
        assert np.abs(ours[name] - theirs[name]).max() < 1e-3 * 1e-2, name


def test_engine_resumes_from_mlx_optimizer_state_and_evaluates_like_mlx() -> None:
    cfg, weights, _ = case("small", "swiglu-tied")
    opt_cfg = OptimConfig(lr=1e-2, eps=1e-4)
    model = build_mlx(cfg, weights)
    mlx_opt = mlx_model.make_optimizer(opt_cfg)
    step = mlx_model.make_train_step(model, mlx_opt, opt_cfg.grad_clip)
    for i in range(3):
        inputs, targets = batch(cfg, seed=20 + i)
        mx.eval(step(mx.array(inputs), mx.array(targets)), model.state, mlx_opt.state)
        if i == 1:
            engine = FastNumpyEngine(cfg, opt_cfg, weights={k: np.array(w) for k, w in
                                                           model.named_weights().items()},
                                     optimizer={k: np.array(v) for k, v in
                                                tree_flatten(mlx_opt.state)})
    engine.step(inputs, targets, opt_cfg.lr)
    for name, w in model.named_weights().items():
        assert np.abs(np.array(w) - engine.weights()[name]).max() < 2e-3 * opt_cfg.lr, name
    inputs, targets = batch(cfg, seed=30)
    mask = np.random.default_rng(0).random(targets.shape) < 0.7
    per_token = nn.losses.cross_entropy(model(mx.array(inputs)), mx.array(targets),
                                        reduction="none")
    want = float(np.sum(np.array(per_token) * mask))
    assert engine.eval_loss(inputs, targets, mask) == pytest.approx(want, rel=1e-5)


def test_cached_decoding_equals_full_forward() -> None:
    cfg, weights, (inputs, _) = case("long", "swiglu-tied", B=2, T=150)
    model = fastnp.GPT(cfg, weights)
    full = model.logits(inputs)
    logits, cache = model.decode(inputs[:, :140], None)  # prefill across a block boundary
    np.testing.assert_allclose(logits, full[:, 139], atol=1e-4)
    for t in range(140, 150):
        logits, cache = model.decode(inputs[:, t:t + 1], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-4)


def test_forward_only_loss_equals_training_loss() -> None:
    cfg, weights, (inputs, targets) = case("long", "relu2-untied")
    model = fastnp.GPT(cfg, weights)
    loss, _ = model.loss_and_grads(inputs, targets)
    assert model.loss(inputs, targets) == pytest.approx(loss, rel=1e-6)
    assert model.token_losses(inputs, targets).mean() == pytest.approx(loss, rel=1e-5)


def test_numpy_blas_thread_count_can_be_pinned_and_is_restored() -> None:
    fns = fastnp._numpy_openblas()
    if fns is None:
        pytest.skip("NumPy does not bundle OpenBLAS here")
    get, _ = fns
    before = get()
    with fastnp.blas_threads(1):
        assert get() == 1
    assert get() == before
