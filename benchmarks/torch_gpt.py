"""The mlx-tinylm GPT in PyTorch, for the throughput benchmark only.

Same shapes, parameter names (so `state_dict()` keys are the safetensors names of
`config.ModelConfig.param_shapes()`), initialisation scale and AdamW settings as `model.py`:
pre-norm RMSNorm, non-interleaved ("rotate half") RoPE, causal attention, SwiGLU or ReLU² MLP,
no biases, LM head tied to the embedding; AdamW with bias correction and weight decay on matrices
only; global-norm gradient clipping before the update.

Torch is an optional extra (`pip install -e ".[bench]"`); nothing in `mlx_tinylm/` imports this
file directly — `mlx_tinylm.bench` loads it by path when torch is installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlx_tinylm.config import ModelConfig, OptimConfig

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")  # scaled init, as in model.py


def pick_device() -> str:
    """`mps` on a Mac, else `cuda`, else `cpu`."""
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(cfg: ModelConfig, length: int, offset: int, device: str | torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (length, head_dim/2), for positions offset .. offset+length-1."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float32) * 2 / cfg.head_dim)
    pos = torch.arange(offset, offset + length, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq).to(device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Non-interleaved: the first half of each head pairs with the second half.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list | None = None) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # [keys, values] of earlier positions, grown by concatenation
            if cache[0] is not None:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[0], cache[1] = k, v
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def forward(self, tokens: torch.Tensor, caches: list[list] | None = None,
                offset: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab); with `caches` (one [k, v] list per layer) decode incrementally."""
        cos, sin = rope_tables(self.config, tokens.shape[1], offset, tokens.device)
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        h = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight
        return h @ head.T

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                std = residual_std if any(r in name for r in RESIDUAL_PROJECTIONS) else cfg.init_std
                p.normal_(0.0, std)

    @torch.no_grad()
    def load_named_weights(self, weights: dict) -> None:
        """Copy a flat name -> array dict (NumPy or anything `torch.as_tensor` takes)."""
        params = dict(self.named_parameters())
        if set(params) != set(weights):
            raise ValueError("weights do not match the torch model's parameter names")
        for name, p in params.items():
            p.copy_(torch.as_tensor(weights[name], dtype=torch.float32))


def loss_fn(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model: GPT, opt: OptimConfig) -> torch.optim.AdamW:
    """AdamW as in model.make_optimizer: decay on matrices, none on norm gains."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one fused kernel per group, PyTorch's fastest path on CPU for many small tensors.
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, foreach=True)


def make_train_step(model: GPT, optimizer: torch.optim.Optimizer, grad_clip: float,
                    compile: bool = False) -> Callable[[torch.Tensor, torch.Tensor],
                                                       tuple[float, float]]:
    """step(inputs, targets) -> (loss, grad_norm before clipping), like model.make_train_step.

    With `compile`, forward and backward go through `torch.compile` (inductor); the optimizer
    step stays eager, which is how PyTorch documents compiling a training loop.
    """
    fwd = torch.compile(loss_fn) if compile else loss_fn

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        optimizer.zero_grad(set_to_none=True)
        loss = fwd(model, inputs, targets)
        loss.backward()
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()]))
        optimizer.step()
        return loss.item(), norm.item()

    return step
