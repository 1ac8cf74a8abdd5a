"""The MLX GPT: a small Llama-style decoder.

    tokens -> embed_tokens (+ embed_positions) -> n_layers × Block -> norm -> lm_head -> logits
    Block(x) = x + Attention(Norm(x));  x + MLP(Norm(x))

By default attention uses rotary position embeddings (the non-interleaved "rotate half" layout
that Llama checkpoints use) and a causal mask, the norms are RMSNorm, the MLP is SwiGLU and the
head is tied to the token embedding. The options of `ModelConfig` swap in learned absolute
positions, LayerNorm (gain, no bias), a ReLU² or GELU (tanh approximation) MLP, QK-norm and an
untied head. There are no biases. `reference.py` is the same model in NumPy, name for name.

Initialisation: every matrix (position table included) ~ N(0, init_std); the two projections that
write into the residual stream (o_proj, down_proj) use init_std / sqrt(2 · n_layers) so the
residual variance stays about constant with depth (GPT-2), or zero with `zero_init_residual`;
norm gains start at 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import cpu_ops
from .config import ModelConfig, OptimConfig
from .device import set_blas_threads

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")

# None: use cpu_ops' formulations (same math, several times faster there) when MLX runs on the
# CPU, and MLX's fused kernels on a GPU. True/False force one path (tests compare the two).
CPU_OPS: bool | None = None


# Split CPU training batches across two streams (see batch_streams); False keeps one stream.
SPLIT_BATCH = True


def use_cpu_ops() -> bool:
    return mx.default_device().type == mx.cpu if CPU_OPS is None else CPU_OPS


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class LayerNorm(RMSNorm):
    """LayerNorm with a gain and no bias (nanoGPT's bias=False)."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, None, self.eps)


def make_norm(cfg: ModelConfig, dims: int) -> RMSNorm | LayerNorm:
    return (LayerNorm if cfg.norm == "layernorm" else RMSNorm)(dims, cfg.norm_eps)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (GPT-2's): 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.rope_base = cfg.rope_base
        self.use_rope = cfg.position == "rope"
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        if cfg.qk_norm:  # always RMSNorm over each head, as Qwen3 does
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def rope(self, x: mx.array, offset: int) -> mx.array:
        # Frequencies are derived from the config on every call, never stored: nothing to go stale.
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0,
                            offset=offset)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, T, _ = x.shape

        def heads(t: mx.array) -> mx.array:  # (B, T, d) -> (B, heads, T, head_dim)
            return t.reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            offset = 0 if cache is None else cache.offset
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        if use_cpu_ops():
            out = cpu_ops.attention(q, k, v, self.scale)
        else:
            # One query (decoding) sees every cached key, so it needs no mask.
            mask = "causal" if q.shape[2] > 1 else None
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.kind == "swiglu":
            silu = cpu_ops.silu if use_cpu_ops() else nn.silu
            return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
        if self.kind == "gelu":
            return self.down_proj(gelu_tanh(self.up_proj(x)))
        return self.down_proj(mx.square(nn.relu(self.up_proj(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.context_length, cfg.d_model)
        self.layers = [Block(cfg) for _ in range(cfg.n_layers)]
        self.norm = make_norm(cfg, cfg.d_model)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        x = self.embed_tokens(tokens)
        if "embed_positions" in self:
            # Generation keeps positions inside the trained range (generate.py's sliding window).
            offset = 0 if cache is None else cache[0].offset
            x = x + self.embed_positions(mx.arange(offset, offset + tokens.shape[-1]))
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i])
        return self.norm(x)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Logits (B, T, vocab) for int tokens (B, T)."""
        h = self.model(tokens, cache)
        if self.config.tie_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def init_weights(self, seed: int | None = None) -> None:
        """The stated initialisation (module docstring); `seed` makes it reproducible."""
        key = mx.random.key(seed) if seed is not None else None
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        new = {}
        for name, shape in cfg.param_shapes().items():
            if len(shape) == 1:
                new[name] = mx.ones(shape)
                continue
            residual = any(p in name for p in RESIDUAL_PROJECTIONS)
            if residual and cfg.zero_init_residual:
                new[name] = mx.zeros(shape)
                continue
            std = residual_std if residual else cfg.init_std
            if key is not None:
                key, sub = mx.random.split(key)
                new[name] = std * mx.random.normal(shape, key=sub)
            else:
                new[name] = std * mx.random.normal(shape)
        self.update(tree_unflatten(list(new.items())))
        mx.eval(self.parameters())

    def named_weights(self) -> dict[str, mx.array]:
        """Flat name -> array dict (the safetensors names)."""
        return dict(tree_flatten(self.parameters()))

    def load_named_weights(self, weights: dict[str, mx.array]) -> None:
        """Load a flat name -> array dict; names and shapes must match the config exactly."""
        expected = self.config.param_shapes()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"weight {name} has shape {tuple(weights[name].shape)}, "
                                 f"config expects {shape}")
        self.update(tree_unflatten([(k, weights[k].astype(mx.float32)) for k in expected]))


class KVCache:
    """Keys and values of one layer for incremental decoding, grown in chunks."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, T, D = k.shape
        if self.keys is None or self.offset + T > self.keys.shape[2]:
            grow = ((T + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), k.dtype)
            new_v = mx.zeros((B, H, grow, D), v.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : self.offset + T, :] = k
        self.values[..., self.offset : self.offset + T, :] = v
        self.offset += T
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def make_cache(model: GPT) -> list[KVCache]:
    return [KVCache() for _ in model.model.layers]


def token_losses(model: GPT, inputs: mx.array, targets: mx.array) -> mx.array:
    """Next-token cross-entropy of every position, (B, T), in nats."""
    logits = model(inputs)
    if use_cpu_ops():
        return cpu_ops.token_cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def loss_fn(model: GPT, inputs: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy in nats."""
    logits = model(inputs)
    if use_cpu_ops():
        return cpu_ops.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


# ----- optimizer and compiled step -------------------------------------------------------------

class ScaledMultiOptimizer(optim.MultiOptimizer):
    """A MultiOptimizer whose groups run at fixed multiples of one learning rate.

    Setting `learning_rate` (what the schedule does every step) sets group i to
    `learning_rate · scales[i]`, so Muon and AdamW follow the same schedule shape from their own
    peaks.
    """

    def __init__(self, optimizers: list[optim.Optimizer], filters: list[Callable],
                 scales: list[float]):
        super().__init__(optimizers, filters)
        self.scales = scales

    @property
    def learning_rate(self) -> mx.array:
        return self.optimizers[0].learning_rate / self.scales[0]

    @learning_rate.setter
    def learning_rate(self, learning_rate: float | mx.array) -> None:
        for o, scale in zip(self.optimizers, self.scales, strict=True):
            o.learning_rate = learning_rate * scale


def is_hidden_matrix(path: str, weight: mx.array) -> bool:
    """The matrices inside the blocks (attention and MLP projections): Muon's share."""
    return path.startswith("model.layers.") and weight.ndim == 2


def make_optimizer(opt: OptimConfig) -> optim.Optimizer:
    """The optimizer of `opt` (see OptimConfig).

    AdamW: with bias correction; weight decay on matrices only (not on norm gains); two groups,
    matrices first. Muon: three groups, the hidden matrices under Muon first, then the two AdamW
    groups (embeddings and head with weight decay, norm gains without).
    """

    def adamw(weight_decay: float) -> optim.AdamW:
        return optim.AdamW(opt.lr, betas=list(opt.betas), eps=opt.eps, weight_decay=weight_decay,
                           bias_correction=True)

    def is_matrix(path: str, weight: mx.array) -> bool:
        return weight.ndim >= 2

    if opt.optimizer == "muon":
        muon = optim.Muon(opt.muon_lr, momentum=opt.muon_momentum,
                          weight_decay=opt.muon_weight_decay, nesterov=True, ns_steps=5)
        return ScaledMultiOptimizer([muon, adamw(opt.weight_decay), adamw(0.0)],
                                    [is_hidden_matrix, is_matrix],
                                    [opt.muon_lr / opt.lr, 1.0, 1.0])
    return optim.MultiOptimizer([adamw(opt.weight_decay), adamw(0.0)], [is_matrix])


TrainStep = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]
LossAndGrad = Callable[..., tuple[mx.array, dict]]


def batch_streams() -> list[mx.Stream]:
    """CPU streams to split a training batch across: two on a multi-core CPU, else none.

    MLX runs each stream's operations on its own thread, so two halves of a batch keep two cores
    busy with everything — the norms, softmax and exp-heavy operations too, which MLX's CPU
    backend otherwise runs on one core while only the matmuls are threaded (by BLAS). BLAS is
    then given cores/2 threads per stream. Create the step on the thread that will call it:
    streams belong to the thread that made them.
    """
    cores = os.cpu_count() or 1
    if not use_cpu_ops() or cores < 2 or not SPLIT_BATCH:
        return []
    set_blas_threads(max(1, cores // 2))
    return [mx.new_stream(mx.cpu) for _ in range(2)]


def split_rows(fn: Callable[..., mx.array], streams: list[mx.Stream],
               *arrays: mx.array) -> mx.array:
    """fn(*shares) on shares of the leading axis, each on its own stream, concatenated."""
    n = arrays[0].shape[0]
    if len(streams) < 2 or n < 2:
        return fn(*arrays)
    edges = [round(i * n / len(streams)) for i in range(len(streams) + 1)]
    outs = []
    for stream, a, b in zip(streams, edges[:-1], edges[1:], strict=True):
        with mx.stream(stream):
            outs.append(fn(*(x[a:b] for x in arrays)))
    return mx.concatenate(outs, axis=0)


def split_loss_and_grad(loss_and_grad: LossAndGrad, streams: list[mx.Stream], model: GPT,
                        inputs: mx.array, targets: mx.array) -> tuple[mx.array, dict]:
    """loss_and_grad over the whole batch, computed as shares on `streams` and combined.

    The loss is a mean over tokens, so the full-batch loss and gradient are the shares' means
    weighted by their token counts: the same numbers as one pass over the batch.
    """
    n = inputs.shape[0]
    if len(streams) < 2 or n < 2:
        return loss_and_grad(model, inputs, targets)
    edges = [round(i * n / len(streams)) for i in range(len(streams) + 1)]
    parts = []
    for stream, a, b in zip(streams, edges[:-1], edges[1:], strict=True):
        with mx.stream(stream):
            loss, grads = loss_and_grad(model, inputs[a:b], targets[a:b])
        parts.append(((b - a) / n, loss, grads))
    loss = sum(w * part_loss for w, part_loss, _ in parts)
    weights = [w for w, _, _ in parts]
    grads = tree_map(lambda *gs: sum(w * g for w, g in zip(weights, gs, strict=True)),
                     *[g for _, _, g in parts])
    return loss, grads


def make_train_step(model: GPT, optimizer: optim.Optimizer, grad_clip: float,
                    compile: bool = True) -> TrainStep:
    """step(inputs, targets) -> (loss, grad_norm): forward, backward, clip, AdamW update.

    Model and optimizer state are inputs and outputs of the compiled graph, so one `mx.eval`
    of (loss, grad_norm, state) per step runs the whole update. Set `optimizer.learning_rate`
    before a call to change the learning rate; it is part of the state, so nothing recompiles.
    The returned grad_norm is the norm before clipping. On a multi-core CPU the batch is split
    across two streams (`batch_streams`; set SPLIT_BATCH = False to keep one).
    """
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    streams = batch_streams()

    def step(inputs: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
        loss, grads = split_loss_and_grad(loss_and_grad, streams, model, inputs, targets)
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return loss, norm

    if not compile:
        return step
    state = [model.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)
