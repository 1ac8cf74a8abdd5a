"""The GPT of `model.py` in NumPy with a hand-written backward pass: the oracle and fallback engine.

It mirrors `model.py` name for name (RMSNorm, LayerNorm, Attention, MLP, Block, Transformer, GPT,
loss_fn), every option of `ModelConfig` included, and reads and writes the same name -> array
dict (the names of `ModelConfig.param_shapes()`).
Every layer has an explicit `forward(w, x) -> (y, cache)` and `backward(w, dy, cache, grads) -> dx`
(no autograd): `w` is the weight dict, `backward` adds the layer's parameter gradients to `grads`.
The dtype of the weights (float32 or float64) is the dtype of the whole computation; the tests
use float64 for finite differences and float32 to compare with MLX.

`AdamW` and `clip_grad_norm` reproduce `model.make_optimizer` (MLX AdamW with bias correction,
weight decay on matrices only) and `mlx.optimizers.clip_grad_norm` operation for operation, so
one NumPy `train_step` and one compiled MLX step from the same state give the same weights.

Written to be obviously correct, not fast: a separate module owns a fast NumPy engine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import ModelConfig, OptimConfig

Params = dict[str, np.ndarray]
Cache = tuple[Any, ...]

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")


# ----- small building blocks -------------------------------------------------------------------

def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """nn.Linear without bias: weights are stored (out, in), as in MLX."""
    return x @ weight.T


def linear_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dweight) of y = x @ weight.T."""
    dweight = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dy @ weight, dweight


def _accumulate(grads: Params, name: str, g: np.ndarray) -> None:
    # Only the tied embedding receives two contributions (input lookup and LM head).
    grads[name] = grads[name] + g if name in grads else g


def sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number only, so no overflow warnings at either tail.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def rope_tables(T: int, head_dim: int, base: float, dtype: np.dtype
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, shape (T, head_dim/2), of angle = position · base^(-2i/head_dim).

    This is `mx.fast.rope(x, head_dim, traditional=False, base=base, scale=1.0, offset=0)`.
    """
    half = head_dim // 2
    inv_freq = base ** (-2.0 * np.arange(half) / head_dim)
    angle = np.arange(T)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the pairs (x[i], x[i + half]) ("rotate half", the non-traditional layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """A rotation's gradient is the inverse rotation of the output gradient."""
    half = dy.shape[-1] // 2
    d1, d2 = dy[..., :half], dy[..., half:]
    return np.concatenate([d1 * cos + d2 * sin, -d1 * sin + d2 * cos], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gelu_tanh(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU, tanh approximation (model.gelu_tanh), and tanh(u) for the backward pass."""
    t = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1 + t), t


def gelu_tanh_backward(dy: np.ndarray, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d/dx of 0.5·x·(1 + tanh(u)), u = c·(x + a·x³): 0.5·(1 + t) + 0.5·x·(1 - t²)·c·(1 + 3a·x²)."""
    c = math.sqrt(2 / math.pi)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))


# ----- layers (same names as model.py) ---------------------------------------------------------

class RMSNorm:
    """y = x / sqrt(mean(x², -1) + eps) · weight."""

    def __init__(self, name: str, eps: float):
        self.name = f"{name}.weight"
        self.eps = eps

    def forward(self, w: Params, x: np.ndarray) -> tuple[np.ndarray, Cache]:
        r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)
        xhat = x * r
        return xhat * w[self.name], (xhat, r)

    def backward(self, w: Params, dy: np.ndarray, cache: Cache, grads: Params) -> np.ndarray:
        xhat, r = cache
        _accumulate(grads, self.name, (dy * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0))
        dxhat = dy * w[self.name]
        # r depends on x too: remove the part of dxhat along xhat.
        return r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))


class LayerNorm(RMSNorm):
    """y = (x - mean(x)) / sqrt(var(x) + eps) · weight (a gain, no bias): RMSNorm of the
    centred input."""

    def forward(self, w: Params, x: np.ndarray) -> tuple[np.ndarray, Cache]:
        return super().forward(w, x - np.mean(x, axis=-1, keepdims=True))

    def backward(self, w: Params, dy: np.ndarray, cache: Cache, grads: Params) -> np.ndarray:
        # Centring is linear: its backward removes the mean of the gradient it receives.
        dc = super().backward(w, dy, cache, grads)
        return dc - np.mean(dc, axis=-1, keepdims=True)


def make_norm(cfg: ModelConfig, name: str) -> RMSNorm | LayerNorm:
    return (LayerNorm if cfg.norm == "layernorm" else RMSNorm)(name, cfg.norm_eps)


class Attention:
    """Causal multi-head self-attention; optional QK-norm, then RoPE, on queries and keys."""

    def __init__(self, cfg: ModelConfig, name: str):
        self.name = name
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.rope_base = cfg.rope_base
        self.use_rope = cfg.position == "rope"
        # QK-norm is RMSNorm over each head (Qwen3), whatever the block norms are.
        self.q_norm = RMSNorm(f"{name}.q_norm", cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(f"{name}.k_norm", cfg.norm_eps) if cfg.qk_norm else None

    def _w(self, w: Params, proj: str) -> np.ndarray:
        return w[f"{self.name}.{proj}.weight"]

    def _heads(self, t: np.ndarray) -> np.ndarray:  # (B, T, d) -> (B, heads, T, head_dim)
        B, T, _ = t.shape
        return t.reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

    @staticmethod
    def _merge(t: np.ndarray) -> np.ndarray:  # (B, heads, T, head_dim) -> (B, T, d)
        B, H, T, D = t.shape
        return t.transpose(0, 2, 1, 3).reshape(B, T, H * D)

    def forward(self, w: Params, x: np.ndarray) -> tuple[np.ndarray, Cache]:
        T = x.shape[1]
        q = self._heads(linear(x, self._w(w, "q_proj")))
        k = self._heads(linear(x, self._w(w, "k_proj")))
        v = self._heads(linear(x, self._w(w, "v_proj")))
        c_qn = c_kn = None
        if self.q_norm is not None and self.k_norm is not None:
            q, c_qn = self.q_norm.forward(w, q)
            k, c_kn = self.k_norm.forward(w, k)
        cos = sin = None
        if self.use_rope:
            cos, sin = rope_tables(T, self.head_dim, self.rope_base, x.dtype)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        scores = (q @ k.swapaxes(-1, -2)) * self.scale
        causal = np.tril(np.ones((T, T), dtype=bool))
        p = softmax(np.where(causal, scores, -np.inf))
        merged = self._merge(p @ v)
        return linear(merged, self._w(w, "o_proj")), (x, q, k, v, p, merged, cos, sin, c_qn, c_kn)

    def backward(self, w: Params, dy: np.ndarray, cache: Cache, grads: Params) -> np.ndarray:
        x, q, k, v, p, merged, cos, sin, c_qn, c_kn = cache
        dmerged, dwo = linear_backward(dy, merged, self._w(w, "o_proj"))
        _accumulate(grads, f"{self.name}.o_proj.weight", dwo)
        dout = self._heads(dmerged)
        dv = p.swapaxes(-1, -2) @ dout
        dp = dout @ v.swapaxes(-1, -2)
        # Softmax backward; masked entries have p = 0 and so get no gradient.
        dscores = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * self.scale
        dq, dk = dscores @ k, dscores.swapaxes(-1, -2) @ q
        if self.use_rope:
            dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
        if self.q_norm is not None and self.k_norm is not None:
            dq = self.q_norm.backward(w, dq, c_qn, grads)
            dk = self.k_norm.backward(w, dk, c_kn, grads)
        dx = np.zeros_like(x)
        for proj, dproj in (("q_proj", dq), ("k_proj", dk), ("v_proj", dv)):
            dxi, dwi = linear_backward(self._merge(dproj), x, self._w(w, proj))
            _accumulate(grads, f"{self.name}.{proj}.weight", dwi)
            dx += dxi
        return dx


class MLP:
    """SwiGLU: down(silu(gate(x)) · up(x)); ReLU²: down(relu(up(x))²); GELU: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig, name: str):
        self.name = name
        self.kind = cfg.mlp

    def _w(self, w: Params, proj: str) -> np.ndarray:
        return w[f"{self.name}.{proj}.weight"]

    def forward(self, w: Params, x: np.ndarray) -> tuple[np.ndarray, Cache]:
        up = linear(x, self._w(w, "up_proj"))
        if self.kind == "swiglu":
            gate = linear(x, self._w(w, "gate_proj"))
            sig = sigmoid(gate)
            act = gate * sig  # silu
            h = act * up
            return linear(h, self._w(w, "down_proj")), (x, h, up, gate, sig, act)
        if self.kind == "gelu":
            h, t = gelu_tanh(up)
            return linear(h, self._w(w, "down_proj")), (x, h, up, t)
        r = np.maximum(up, 0)
        h = r * r
        return linear(h, self._w(w, "down_proj")), (x, h, r)

    def backward(self, w: Params, dy: np.ndarray, cache: Cache, grads: Params) -> np.ndarray:
        x, h = cache[0], cache[1]
        dh, dwd = linear_backward(dy, h, self._w(w, "down_proj"))
        _accumulate(grads, f"{self.name}.down_proj.weight", dwd)
        if self.kind == "swiglu":
            _, _, up, gate, sig, act = cache
            dup = dh * act
            dgate = dh * up * sig * (1 + gate * (1 - sig))  # d silu(g)/dg = σ + g·σ·(1-σ)
            dx_gate, dwg = linear_backward(dgate, x, self._w(w, "gate_proj"))
            _accumulate(grads, f"{self.name}.gate_proj.weight", dwg)
        elif self.kind == "gelu":
            _, _, up, t = cache
            dup = gelu_tanh_backward(dh, up, t)
            dx_gate = 0
        else:
            r = cache[2]
            dup = dh * 2 * r  # zero where up <= 0
            dx_gate = 0
        dx_up, dwu = linear_backward(dup, x, self._w(w, "up_proj"))
        _accumulate(grads, f"{self.name}.up_proj.weight", dwu)
        return dx_up + dx_gate


class Block:
    """x + Attention(Norm(x)); then x + MLP(Norm(x))."""

    def __init__(self, cfg: ModelConfig, name: str):
        self.input_layernorm = make_norm(cfg, f"{name}.input_layernorm")
        self.self_attn = Attention(cfg, f"{name}.self_attn")
        self.post_attention_layernorm = make_norm(cfg, f"{name}.post_attention_layernorm")
        self.mlp = MLP(cfg, f"{name}.mlp")

    def forward(self, w: Params, x: np.ndarray) -> tuple[np.ndarray, Cache]:
        a, c_n1 = self.input_layernorm.forward(w, x)
        attn, c_attn = self.self_attn.forward(w, a)
        x = x + attn
        b, c_n2 = self.post_attention_layernorm.forward(w, x)
        mlp, c_mlp = self.mlp.forward(w, b)
        return x + mlp, (c_n1, c_attn, c_n2, c_mlp)

    def backward(self, w: Params, dy: np.ndarray, cache: Cache, grads: Params) -> np.ndarray:
        c_n1, c_attn, c_n2, c_mlp = cache
        db = self.mlp.backward(w, dy, c_mlp, grads)
        dx = dy + self.post_attention_layernorm.backward(w, db, c_n2, grads)
        da = self.self_attn.backward(w, dx, c_attn, grads)
        return dx + self.input_layernorm.backward(w, da, c_n1, grads)


class Transformer:
    """embed_tokens (+ embed_positions) -> layers -> norm."""

    def __init__(self, cfg: ModelConfig, name: str = "model"):
        self.embed_name = f"{name}.embed_tokens.weight"
        self.positions_name = (f"{name}.embed_positions.weight" if cfg.position == "learned"
                               else None)
        self.layers = [Block(cfg, f"{name}.layers.{i}") for i in range(cfg.n_layers)]
        self.norm = make_norm(cfg, f"{name}.norm")

    def forward(self, w: Params, tokens: np.ndarray) -> tuple[np.ndarray, Cache]:
        x = w[self.embed_name][tokens]
        if self.positions_name is not None:
            x = x + w[self.positions_name][: tokens.shape[-1]]
        caches = []
        for layer in self.layers:
            x, c = layer.forward(w, x)
            caches.append(c)
        h, c_norm = self.norm.forward(w, x)
        return h, (tokens, caches, c_norm)

    def backward(self, w: Params, dh: np.ndarray, cache: Cache, grads: Params) -> None:
        tokens, caches, c_norm = cache
        dx = self.norm.backward(w, dh, c_norm, grads)
        for layer, c in zip(reversed(self.layers), reversed(caches), strict=True):
            dx = layer.backward(w, dx, c, grads)
        if self.positions_name is not None:
            dpos = np.zeros_like(w[self.positions_name])
            dpos[: tokens.shape[-1]] = dx.reshape(-1, *dx.shape[-2:]).sum(axis=0)
            _accumulate(grads, self.positions_name, dpos)
        embed = w[self.embed_name]
        dembed = np.zeros_like(embed)
        np.add.at(dembed, tokens.reshape(-1), dx.reshape(-1, embed.shape[1]))
        _accumulate(grads, self.embed_name, dembed)


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy in nats over every target, and its gradient w.r.t. the logits."""
    flat = logits.reshape(-1, logits.shape[-1])
    t = np.asarray(targets).reshape(-1)
    rows = np.arange(t.size)
    z = flat - flat.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True))
    logp = z - lse
    loss = -float(np.mean(logp[rows, t]))
    dlogits = np.exp(logp)
    dlogits[rows, t] -= 1
    return loss, (dlogits / t.size).reshape(logits.shape)


class GPT:
    """The model: weights in `.weights` (safetensors name -> array), forward and backward."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Any] | None = None,
                 dtype: Any = np.float32, seed: int = 0):
        self.config = cfg
        self.dtype = np.dtype(dtype)
        self.model = Transformer(cfg)
        self.weights: Params = (self.init_weights(seed) if weights is None
                                else self._checked(weights))

    def init_weights(self, seed: int = 0) -> Params:
        """model.GPT.init_weights in NumPy: N(0, init_std) matrices, residual projections
        scaled by 1/sqrt(2·n_layers) (or zero with `zero_init_residual`), norm gains 1.
        Returns the weights and keeps them."""
        cfg = self.config
        rng = np.random.default_rng(seed)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        new: Params = {}
        for name, shape in cfg.param_shapes().items():
            if len(shape) == 1:
                new[name] = np.ones(shape, self.dtype)
                continue
            residual = any(p in name for p in RESIDUAL_PROJECTIONS)
            if residual and cfg.zero_init_residual:
                new[name] = np.zeros(shape, self.dtype)
                continue
            std = residual_std if residual else cfg.init_std
            new[name] = (std * rng.standard_normal(shape)).astype(self.dtype)
        self.weights = new
        return new

    def _checked(self, weights: dict[str, Any]) -> Params:
        expected = self.config.param_shapes()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        out: Params = {}
        for name, shape in expected.items():
            arr = np.array(weights[name], dtype=self.dtype)  # a copy: updates stay ours
            if arr.shape != shape:
                raise ValueError(f"weight {name} has shape {arr.shape}, config expects {shape}")
            out[name] = arr
        return out

    def _head(self) -> np.ndarray:
        if self.config.tie_embeddings:
            return self.weights[self.model.embed_name]
        return self.weights["lm_head.weight"]

    def _forward(self, tokens: np.ndarray) -> tuple[np.ndarray, Cache]:
        h, cache = self.model.forward(self.weights, np.asarray(tokens))
        return linear(h, self._head()), (h, cache)

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, T, vocab) for int tokens (B, T)."""
        return self._forward(tokens)[0]

    __call__ = forward

    def backward(self, dlogits: np.ndarray, cache: Cache) -> Params:
        """Gradients of every weight, given the gradient of the logits."""
        h, model_cache = cache
        grads: Params = {}
        dh, dhead = linear_backward(dlogits, h, self._head())
        _accumulate(grads, self.model.embed_name if self.config.tie_embeddings
                    else "lm_head.weight", dhead)
        self.model.backward(self.weights, dh, model_cache, grads)
        return {name: grads[name] for name in self.weights}

    def loss_and_grads(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, Params]:
        """Mean next-token cross-entropy (nats) and its gradient for every weight."""
        logits, cache = self._forward(inputs)
        loss, dlogits = cross_entropy(logits, targets)
        return loss, self.backward(dlogits, cache)


def loss_fn(model: GPT, inputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token cross-entropy in nats (model.loss_fn)."""
    return cross_entropy(model.forward(inputs), targets)[0]


# ----- optimizer and training step -------------------------------------------------------------

def global_norm(grads: Params) -> float:
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


def clip_grad_norm(grads: Params, max_norm: float) -> tuple[Params, float]:
    """mlx.optimizers.clip_grad_norm: scale every gradient by min(max_norm / (norm + 1e-6), 1).

    Returns the scaled gradients and the norm before clipping.
    """
    norm = global_norm(grads)
    scale = min(max_norm / (norm + 1e-6), 1.0)
    return {k: (g * scale).astype(g.dtype) for k, g in grads.items()}, norm


def param_group(param: np.ndarray) -> int:
    """Index of the AdamW in model.make_optimizer's MultiOptimizer: 0 decays (matrices), 1 not."""
    return 0 if param.ndim >= 2 else 1


class AdamW:
    """model.make_optimizer in NumPy: MLX AdamW with bias correction, decoupled weight decay on
    matrices (ndim >= 2) only. Per parameter, with t the step count after this update:

        p <- p · (1 - lr · wd);  m <- b1·m + (1-b1)·g;  v <- b2·v + (1-b2)·g²
        p <- p - lr/(1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    `state_dict()` uses the flat names of MLX's optimizer state (`states.<group>.step`,
    `states.<group>.<param>.m`, ...), so optimizer checkpoints move between the engines.
    """

    def __init__(self, opt: OptimConfig):
        self.config = opt
        self.step = 0
        self.learning_rate = opt.lr  # the last rate used; kept only for the state dict
        self.m: Params = {}
        self.v: Params = {}

    def init(self, params: Params) -> None:
        """Zero moments for every parameter that has none yet (update does this lazily)."""
        for name, p in params.items():
            if name not in self.m:
                self.m[name], self.v[name] = np.zeros_like(p), np.zeros_like(p)

    def update(self, params: Params, grads: Params, lr: float) -> None:
        """One update of `params`, in place."""
        b1, b2 = self.config.betas
        self.init(params)
        self.step += 1
        self.learning_rate = lr
        c1 = lr / (1 - b1**self.step)
        c2 = 1 / math.sqrt(1 - b2**self.step)
        for name, g in grads.items():
            p = params[name]
            if self.m[name].shape != p.shape:
                raise ValueError(f"optimizer state for {name} has shape {self.m[name].shape}, "
                                 f"the parameter {p.shape}")
            # Moments loaded from a checkpoint may be float32 while the model is float64.
            m = self.m[name] = self.m[name].astype(p.dtype, copy=False)
            v = self.v[name] = self.v[name].astype(p.dtype, copy=False)
            wd = self.config.weight_decay if param_group(p) == 0 else 0.0
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * np.square(g)
            p *= 1 - lr * wd
            p -= c1 * m / (np.sqrt(v) * c2 + self.config.eps)

    def state_dict(self) -> Params:
        """Flat name -> array copies of the step count, learning rate and moments."""
        out: Params = {}
        for group in (0, 1):
            out[f"states.{group}.step"] = np.array(self.step, dtype=np.uint64)
            out[f"states.{group}.learning_rate"] = np.array(self.learning_rate, np.float32)
        for name, m in self.m.items():
            group = param_group(m)
            out[f"states.{group}.{name}.m"] = m.copy()
            out[f"states.{group}.{name}.v"] = self.v[name].copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (of either engine)."""
        m: Params = {}
        v: Params = {}
        for key, value in state.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "states" or parts[1] not in ("0", "1"):
                raise ValueError(f"unexpected optimizer state entry {key!r}")
            rest = parts[2]
            if rest in ("step", "learning_rate"):
                continue
            name, _, moment = rest.rpartition(".")
            if moment not in ("m", "v") or not name:
                raise ValueError(f"unexpected optimizer state entry {key!r}")
            (m if moment == "m" else v)[name] = np.array(value)
        if set(m) != set(v):
            raise ValueError("optimizer state has first and second moments for different "
                             "parameters")
        self.step = int(np.asarray(state["states.0.step"]))
        self.learning_rate = float(np.asarray(state.get("states.0.learning_rate",
                                                        self.config.lr)))
        self.m, self.v = m, v


def train_step(model: GPT, optimizer: AdamW, inputs: np.ndarray, targets: np.ndarray,
               lr: float, grad_clip: float) -> tuple[float, float]:
    """Forward, backward, clip (when grad_clip > 0), AdamW update: the MLX compiled step's work.

    Returns (loss, gradient norm before clipping).
    """
    loss, grads = model.loss_and_grads(inputs, targets)
    if grad_clip > 0:
        grads, norm = clip_grad_norm(grads, grad_clip)
    else:
        norm = global_norm(grads)
    optimizer.update(model.weights, grads, lr)
    return loss, norm
