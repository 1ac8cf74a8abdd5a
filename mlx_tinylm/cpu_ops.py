"""Attention, cross-entropy and SiLU written to be fast on MLX's CPU backend; same math.

Why these exist (measured on the 2-core x86-64 Linux machines, MLX 0.32 CPU wheel; see
benchmarks/NOTES.md): the wheel is built for baseline x86-64, so `mx.exp`, `mx.sigmoid` and the
softmax/logsumexp primitives run a scalar polynomial per element (~12 ns), while `mx.power` calls
the C library (~4 ns) — `2 ** (x · log2 e)` is `exp(x)` to within one float32 ulp at a quarter of
the cost. `mx.fast.scaled_dot_product_attention` has no CPU kernel and falls back to the plain
composition, spending half its softmax on masked entries. Here:

- `softmax`: exp through `mx.power`, with the standard closed-form backward (a custom vjp, so
  autodiff does not differentiate `power` through its base).
- `attention`: causal attention in query blocks of `BLOCK` rows; block i only multiplies the
  keys it can see, so fully masked score blocks are never computed (25% fewer at T=256).
- `cross_entropy`: one exp pass in the forward; the softmax it produces is reused by the
  backward, `(softmax - onehot) / N`, instead of a second exp pass.
- `silu`: `x / (1 + 2 ** (-x · log2 e))` with its closed-form derivative.

On Metal and CUDA the built-in fused kernels are faster; `model.py` uses these functions only
when MLX runs on the CPU.
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2_E = 1.0 / math.log(2.0)
BLOCK = 128  # query rows per attention block


def exp(x: mx.array) -> mx.array:
    """e**x computed as 2**(x·log2 e) (within one float32 ulp of `mx.exp`, ~3× faster on CPU)."""
    return mx.power(2.0, x * LOG2_E)


def _single(primals):  # custom_function passes a lone primal bare, several as a sequence
    return primals[0] if isinstance(primals, (list, tuple)) else primals


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (rows may contain -inf, not only -inf)."""
    e = exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True)),)


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    return x / (1.0 + exp(-x))


@silu.vjp
def _silu_vjp(primals, cotangent, output):
    x = _single(primals)
    s = 1.0 / (1.0 + exp(-x))
    return (cotangent * s * (1.0 + x * (1.0 - s)),)


@mx.custom_function
def _cross_entropy_rows(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Per-row loss, and the softmax as a second output so the vjp can reuse it."""
    m = mx.max(logits, axis=-1, keepdims=True)
    e = exp(logits - m)
    s = mx.sum(e, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (m + mx.log(s) - picked)[..., 0], e / s


@_cross_entropy_rows.vjp
def _cross_entropy_rows_vjp(primals, cotangents, outputs):
    logits, targets = primals
    g = cotangents[0]
    probs = outputs[1]
    onehot = mx.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    return (probs - onehot) * g[..., None], mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy in nats (same value as nn.losses.cross_entropy)."""
    return mx.mean(_cross_entropy_rows(logits, targets)[0])


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy of every position (reduction "none")."""
    return _cross_entropy_rows(logits, targets)[0]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention for q (B, H, Tq, D) against k, v (B, H, Tk, D), Tk >= Tq.

    Query i sits at position Tk - Tq + i (a KV cache holds the earlier ones), so it sees keys
    0 .. Tk - Tq + i, like the bottom-right-aligned "causal" mask of mx.fast.
    """
    tq, tk = q.shape[2], k.shape[2]
    q = q * scale
    if tq == 1:  # one decoding query sees every cached key
        return softmax(q @ k.swapaxes(-1, -2)) @ v
    past = tk - tq
    pos = mx.arange(tk)
    outs = []
    for start in range(0, tq, BLOCK):
        stop = min(start + BLOCK, tq)
        seen = past + stop  # keys visible to the last query of this block
        rows = past + mx.arange(start, stop)
        mask = mx.where(pos[None, :seen] > rows[:, None], -math.inf, 0.0)
        scores = q[:, :, start:stop] @ k[:, :, :seen].swapaxes(-1, -2) + mask
        outs.append(softmax(scores) @ v[:, :, :seen])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
