"""Tiny model configurations and weights shared by the reference and equivalence tests."""

from __future__ import annotations

import numpy as np

from mlx_tinylm.config import ModelConfig

# Every MLP kind, both head kinds, both norms, both position encodings and QK-norm; the second
# config also moves the RoPE base and norm eps off their defaults, so an engine that ignores the
# config is caught. "gelu-learned" is the nanoGPT baseline's architecture.
VARIANTS = {
    "swiglu-tied": dict(mlp="swiglu", tie_embeddings=True),
    "relu2-untied": dict(mlp="relu2", tie_embeddings=False, rope_base=500.0, norm_eps=1e-4),
    "gelu-learned": dict(mlp="gelu", position="learned", norm="layernorm", tie_embeddings=True),
    "relu2-qknorm-layernorm": dict(mlp="relu2", qk_norm=True, norm="layernorm",
                                   tie_embeddings=False),
}


def small_config(variant: str) -> ModelConfig:
    """For float32 comparisons between the engines: runs in milliseconds."""
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, context_length=16,
                       **VARIANTS[variant])


def fd_config(variant: str) -> ModelConfig:
    """Smaller still, for finite differences over every single weight."""
    return ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, context_length=6,
                       mlp_hidden=16, **VARIANTS[variant])


def wide_weights(cfg: ModelConfig, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Weights that keep activations of order one and norm gains away from 1.

    The stated initialisation (std 0.02) leaves attention nearly uniform, which would hide a
    missing RoPE or a wrong attention scale; these weights make every layer matter.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in cfg.param_shapes().items():
        if len(shape) == 1:
            w = 1 + 0.3 * rng.standard_normal(shape)
        elif "embed_" in name:  # token and position tables
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(dtype)
    return out


def batch(cfg: ModelConfig, seed: int, B: int = 2, T: int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Random (inputs, targets) token batches."""
    rng = np.random.default_rng(seed)
    T = cfg.context_length if T is None else T
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
    return tokens[:, :-1], tokens[:, 1:]
