"""MLX's CPU formulations (cpu_ops.py) equal MLX's built-in kernels: values and gradients.

model.py uses them whenever MLX runs on the CPU; the built-in path is what runs on a GPU. Both
must compute the same model, including attention against a KV cache (queries after a prefix).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import VARIANTS, batch, small_config, wide_weights

import mlx_tinylm  # noqa: F401  (loads OpenBLAS; must precede the first import of mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_tinylm import cpu_ops
from mlx_tinylm import model as mlx_model
from mlx_tinylm.config import ModelConfig


def test_exp_is_within_a_few_ulp_of_mx_exp() -> None:
    x = mx.array(np.linspace(-80, 80, 100_001, dtype=np.float32))
    want = np.exp(np.array(x, dtype=np.float64))
    got = np.array(cpu_ops.exp(x), dtype=np.float64)
    assert np.max(np.abs(got / want - 1)) < 2e-5  # |x| up to 80: x·log2(e) rounding dominates
    small = mx.array(np.linspace(-3, 3, 1001, dtype=np.float32))
    np.testing.assert_allclose(np.array(cpu_ops.exp(small)), np.array(mx.exp(small)), rtol=1e-6)


@pytest.mark.parametrize("tq,tk", [(300, 300), (1, 40), (7, 40), (150, 400)])
def test_blocked_attention_equals_fused_causal_attention(tq: int, tk: int) -> None:
    rng = np.random.default_rng(tq + tk)
    q, k, v = (mx.array(rng.standard_normal((2, 3, t, 16), dtype=np.float32))
               for t in (tq, tk, tk))
    scale = 1 / math.sqrt(16)

    def fused(q, k, v):
        mask = "causal" if q.shape[2] > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def ours(q, k, v):
        return cpu_ops.attention(q, k, v, scale)

    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(fused(q, k, v)), atol=1e-5)
    cot = mx.array(rng.standard_normal((2, 3, tq, 16), dtype=np.float32))
    grads = [mx.grad(lambda *a, f=f: mx.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, fused)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_cross_entropy_and_silu_equal_builtins_with_gradients() -> None:
    rng = np.random.default_rng(0)
    logits = mx.array(5 * rng.standard_normal((4, 9, 33), dtype=np.float32))
    targets = mx.array(rng.integers(0, 33, (4, 9)))

    def builtin_ce(x):
        return nn.losses.cross_entropy(x, targets, reduction="mean")

    def ours_ce(x):
        return cpu_ops.cross_entropy(x, targets)

    assert ours_ce(logits).item() == pytest.approx(builtin_ce(logits).item(), rel=1e-6)
    np.testing.assert_allclose(np.array(mx.grad(ours_ce)(logits)),
                               np.array(mx.grad(builtin_ce)(logits)), atol=1e-7)
    x = mx.array(4 * rng.standard_normal((50, 7), dtype=np.float32))
    np.testing.assert_allclose(np.array(cpu_ops.silu(x)), np.array(nn.silu(x)), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(np.array(mx.grad(lambda a: mx.sum(cpu_ops.silu(a) * a))(x)),
                               np.array(mx.grad(lambda a: mx.sum(nn.silu(a) * a))(x)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_on_cpu_formulations_equals_model_on_builtin_kernels(variant: str) -> None:
    cfg = ModelConfig(**{**small_config(variant).to_dict(), "context_length": 200})
    weights = {k: mx.array(w) for k, w in wide_weights(cfg, 0).items()}
    inputs, targets = (mx.array(a) for a in batch(cfg, seed=1, B=2, T=200))
    results = []
    for flag in (True, False):
        mlx_model.CPU_OPS = flag
        try:
            model = mlx_model.GPT(cfg)
            model.load_named_weights(weights)
            loss, grads = nn.value_and_grad(model, mlx_model.loss_fn)(model, inputs, targets)
            results.append((np.array(model(inputs)), loss.item(),
                            {k: np.array(g) for k, g in tree_flatten(grads)}))
        finally:
            mlx_model.CPU_OPS = None
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    assert np.abs(logits_a - logits_b).max() < 1e-4
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name, g in grads_a.items():
        scale = max(np.linalg.norm(g), np.linalg.norm(grads_b[name]))
        assert np.linalg.norm(g - grads_b[name]) / scale < 1e-4, name


def test_cached_decoding_on_cpu_formulations_equals_full_forward() -> None:
    cfg = ModelConfig(**{**small_config("swiglu-tied").to_dict(), "context_length": 200})
    model = mlx_model.GPT(cfg)
    model.load_named_weights({k: mx.array(w) for k, w in wide_weights(cfg, 3).items()})
    tokens = mx.array(batch(cfg, seed=4, B=1, T=160)[0])
    full = np.array(model(tokens))
    cache = mlx_model.make_cache(model)
    prefill = np.array(model(tokens[:, :140], cache))  # crosses the 128-row block boundary
    np.testing.assert_allclose(prefill, full[:, :140], atol=1e-4)
    chunk = np.array(model(tokens[:, 140:150], cache))  # several queries after a prefix
    np.testing.assert_allclose(chunk, full[:, 140:150], atol=1e-4)
    for t in range(150, 160):
        step = np.array(model(tokens[:, t:t + 1], cache))
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-4)


def test_default_device_picks_the_cpu_formulations_only_on_the_cpu() -> None:
    assert mlx_model.use_cpu_ops() == (mx.default_device().type == mx.cpu)


def test_batch_split_across_streams_gives_the_full_batch_loss_and_gradient() -> None:
    cfg = small_config("relu2-untied")
    model = mlx_model.GPT(cfg)
    model.load_named_weights({k: mx.array(w) for k, w in wide_weights(cfg, 5).items()})
    inputs, targets = (mx.array(a) for a in batch(cfg, seed=6, B=3))  # uneven shares: 1 + 2
    loss_and_grad = nn.value_and_grad(model, mlx_model.loss_fn)
    streams = mlx_model.batch_streams()
    if len(streams) < 2:
        pytest.skip("one core: the batch is not split")
    loss, grads = mlx_model.split_loss_and_grad(loss_and_grad, streams, model, inputs, targets)
    want_loss, want_grads = loss_and_grad(model, inputs, targets)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    for (name, g), (_, w) in zip(tree_flatten(grads), tree_flatten(want_grads), strict=True):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-7, err_msg=name)
    per_token = mlx_model.split_rows(lambda x, y: mlx_model.token_losses(model, x, y), streams,
                                     inputs, targets)
    builtin = nn.losses.cross_entropy(model(inputs), targets, reduction="none")
    np.testing.assert_allclose(np.array(per_token), np.array(builtin), rtol=1e-5)
