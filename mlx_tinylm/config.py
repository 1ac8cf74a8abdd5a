"""Model configuration: the one place for shapes, parameter names, presets and cost estimates.

Every other module (MLX model, NumPy reference, planner, benchmarks) asks this module how big a
model is, what its parameters are called, how many FLOPs a token costs and how much memory
training needs; none of them restates those facts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import TinyLMError

MLP_KINDS = ("swiglu", "relu2", "gelu")
POSITIONS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("wsd", "cosine")
BYTES_PER_PARAM_TRAINING = 16  # fp32 weights + grads + AdamW m and v
FLOAT_BYTES = 4
# The fast NumPy engine (fastnp.py) keeps a flat copy of the weights, AdamW m, v and a
# temporary, and a gradient per worker thread (two): 6 floats a parameter. (Its scratch gradients
# are touched only when a thread takes a second share of the batch, which two threads never do.)
NUMPY_BYTES_PER_PARAM = 24
NUMPY_WORKERS = 2
ATTN_BLOCK = 128  # fastnp: query rows per causal attention block
HEAD_CHUNK_BYTES = 8 << 20  # fastnp: logits chunk of the head + cross-entropy


class ConfigError(TinyLMError, ValueError):
    """A configuration that cannot describe a model; the message says which field and why."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a pre-norm decoder without biases.

    The defaults are the default recipe, chosen by measurement (`benchmarks/recipe.py`, README
    "Recipe"): Llama's layout (RMSNorm, RoPE, no biases) with a ReLU² MLP and an untied head,
    which is Hugging Face's `arcee` model type. The options cover the variants the recipe
    benchmark compares, each loadable by a common runtime's model type:

    - `position`: "rope" (rotary, on queries and keys) or "learned" (an absolute position
      embedding `model.embed_positions.weight` added to the token embedding, as in GPT-2).
    - `norm`: "rmsnorm" or "layernorm" (LayerNorm with a gain and no bias, like nanoGPT's
      `bias=False`); the parameter names are the same for both.
    - `mlp`: "swiglu", "relu2" (ReLU²) or "gelu" (GELU, tanh approximation as in GPT-2).
    - `qk_norm`: RMSNorm with a learned gain over each head of the queries and keys, before RoPE
      (Qwen3's `self_attn.q_norm` / `k_norm`).
    - `zero_init_residual`: the projections that write into the residual stream (o_proj,
      down_proj) start at zero, so every block starts as the identity.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 256
    mlp: str = "relu2"
    mlp_hidden: int | None = None  # None: 8/3·d for SwiGLU, 4·d otherwise, rounded up to 32
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    position: str = "rope"
    norm: str = "rmsnorm"
    qk_norm: bool = False
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived shapes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        """MLP hidden width actually used."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        # SwiGLU has three matrices, so 8/3·d keeps its cost equal to a 4·d two-matrix MLP.
        raw = 8 * self.d_model / 3 if self.mlp == "swiglu" else 4 * self.d_model
        return int(math.ceil(raw / 32) * 32)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "context_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}")
        need(self.mlp in MLP_KINDS, f"mlp must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        need(self.position in POSITIONS,
             f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        need(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need(self.position != "rope" or self.head_dim % 2 == 0,
             f"head dimension d_model/n_heads must be even for RoPE, got {self.head_dim}")
        need(self.mlp_hidden is None or (isinstance(self.mlp_hidden, int)
                                         and not isinstance(self.mlp_hidden, bool)
                                         and self.mlp_hidden > 0),
             f"mlp_hidden must be a positive integer or null, got {self.mlp_hidden!r}")
        for name in ("tie_embeddings", "qk_norm", "zero_init_residual"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        for name in ("rope_base", "norm_eps", "init_std"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool)
                 and math.isfinite(value) and value > 0,
                 f"{name} must be a positive number, got {value!r}")

    # ----- parameters -------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter; these are the safetensors names used everywhere.

        The names follow mlx-lm's Llama layout so a checkpoint reads like one; QK-norm gains use
        Qwen3's names, and the learned position table is `model.embed_positions.weight`.
        """
        d, h, v = self.d_model, self.hidden, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
        if self.position == "learned":
            shapes["model.embed_positions.weight"] = (self.context_length, d)
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (d,)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[p + f"self_attn.{proj}.weight"] = (d, d)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            shapes[p + "post_attention_layernorm.weight"] = (d,)
            if self.mlp == "swiglu":
                shapes[p + "mlp.gate_proj.weight"] = (h, d)
            shapes[p + "mlp.up_proj.weight"] = (h, d)
            shapes[p + "mlp.down_proj.weight"] = (d, h)
        shapes["model.norm.weight"] = (d,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (v, d)
        return shapes

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    @property
    def n_embedding_params(self) -> int:
        """Lookup tables: the token embedding and, when learned, the position embedding."""
        positions = self.context_length * self.d_model if self.position == "learned" else 0
        return self.vocab_size * self.d_model + positions

    @property
    def n_non_embedding_params(self) -> int:
        """Parameters outside the lookup tables (token, position) and outside an untied head."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.n_params - self.n_embedding_params - head

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token: 6·(non-embedding + head params) + 12·layers·context·d_model."""
        t = self.context_length if context is None else context
        head = self.vocab_size * self.d_model
        return 6 * (self.n_non_embedding_params + head) + 12 * self.n_layers * t * self.d_model

    def activation_bytes(self, batch_size: int, context: int | None = None,
                         engine: str = "mlx") -> int:
        """Rough float32 activations kept for the backward pass of one batch (MLX), or the fast
        NumPy engine's preallocated buffers (`engine="numpy"`).

        Per token and layer: residual, two norm outputs, q, k, v, attention output and the o_proj
        input (~10·d), the MLP intermediates (~3·hidden), and attention scores and probabilities
        (2·heads·context, since CPU attention materialises them); plus logits, softmax and their
        gradient (3·vocab) per token at the head.
        """
        t = self.context_length if context is None else context
        if engine == "numpy":
            return self._numpy_buffer_bytes(batch_size, t)
        per_layer = 10 * self.d_model + 3 * self.hidden + 2 * self.n_heads * t
        per_token = self.n_layers * per_layer + 3 * self.vocab_size
        return FLOAT_BYTES * batch_size * t * per_token

    def _numpy_buffer_bytes(self, batch_size: int, t: int) -> int:
        """fastnp.py's buffers: per layer the forward values its backward reads; temporaries
        shared by the layers; attention probabilities in causal blocks (each query row holds
        the keys up to its block's end); the head and cross-entropy in chunks of rows."""
        d, h, heads = self.d_model, self.hidden, self.n_heads
        up = 2 * h if self.mlp == "swiglu" else h
        per_layer = 8 * d + 2 + up + h + (2 * h if self.mlp == "swiglu" else 0)
        shared = 15 * d + up + h + heads + 2
        probs = heads * sum((min(s + ATTN_BLOCK, t) - s) * min(s + ATTN_BLOCK, t)
                            for s in range(0, t, ATTN_BLOCK))  # per sequence and layer
        floats = (batch_size * t * (self.n_layers * per_layer + shared)
                  + batch_size * (self.n_layers + 1) * probs)  # +1: their gradient
        head = NUMPY_WORKERS * (HEAD_CHUNK_BYTES + FLOAT_BYTES * self.vocab_size * d)
        return FLOAT_BYTES * floats + head

    def training_memory_bytes(self, batch_size: int, context: int | None = None,
                              engine: str = "mlx") -> int:
        """Estimated training memory on `engine` ('mlx', 'numpy', or 'auto' for the larger):
        weights, gradients and AdamW state (16 bytes a parameter on MLX, 24 on NumPy) plus
        activations."""
        if engine not in ("mlx", "numpy"):  # 'auto' or not yet chosen: the larger need
            return max(self.training_memory_bytes(batch_size, context, e) for e in ("mlx", "numpy"))
        per_param = NUMPY_BYTES_PER_PARAM if engine == "numpy" else BYTES_PER_PARAM_TRAINING
        return per_param * self.n_params + self.activation_bytes(batch_size, context, engine)

    # ----- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(map(repr, unknown))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: absurd nesting
            raise ConfigError(f"model config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings shared by every engine (MLX, NumPy reference, PyTorch benchmark).

    `optimizer="adamw"`: AdamW on every parameter, weight decay on matrices only.
    `optimizer="muon"`: Muon (momentum, then Newton–Schulz orthogonalisation) on the hidden
    matrices (attention and MLP projections inside the blocks) at peak rate `muon_lr`, and AdamW
    as above on the rest (embeddings, head, norm gains) at peak rate `lr`; the schedule scales
    both alike. Only the MLX engine implements Muon.
    """

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only; norm gains are not decayed
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(math.isfinite(self.lr) and self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"gradient clip must be >= 0, got {self.grad_clip}")
        need(self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(math.isfinite(self.muon_lr) and self.muon_lr > 0,
             f"Muon learning rate must be > 0, got {self.muon_lr}")
        need(0 <= self.muon_momentum < 1,
             f"Muon momentum must be in [0, 1), got {self.muon_momentum}")
        need(self.muon_weight_decay >= 0,
             f"Muon weight decay must be >= 0, got {self.muon_weight_decay}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        """From `asdict()` output read back from JSON (betas come back as a list)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown optimizer config field(s): {', '.join(unknown)}")
        if "betas" in data:
            data = {**data, "betas": tuple(data["betas"])}
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train; the defaults are the 5-minute laptop recipe."""

    minutes: float | None = 5.0  # wall-clock budget (ignored when steps or tokens is set)
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 16
    seed: int = 0
    schedule: str = "wsd"  # learning-rate shape (see schedule.py)
    warmup: float = 0.03  # fractions of the budget
    decay: float = 0.4  # WSD only: the final fraction spent decaying
    final_lr_frac: float = 0.0
    eval_every: float = 0.1  # periodic validation, as a fraction of the budget
    eval_batches: int = 4  # fixed validation subset size, in batches
    checkpoint_every_minutes: float = 2.0
    sample_tokens: int = 48  # length of the sample continuation shown at each evaluation
    log_every_s: float = 0.5  # how often a step is logged and drawn
    engine: str = "auto"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.minutes is None or (math.isfinite(self.minutes) and self.minutes > 0),
             f"--minutes must be > 0, got {self.minutes}")
        need(self.steps is None or self.steps > 0, f"--steps must be > 0, got {self.steps}")
        need(self.tokens is None or self.tokens > 0, f"--tokens must be > 0, got {self.tokens}")
        need(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        need(self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}, "
             f"got {self.engine!r}")
        need(self.checkpoint_every_minutes > 0, "checkpoint interval must be > 0")
        need(self.eval_batches > 0, "eval_batches must be > 0")
        need(self.schedule in SCHEDULES,
             f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(0 < self.eval_every <= 1, f"--eval-every must be in (0, 1], got {self.eval_every}")

    @property
    def budget_kind(self) -> str:
        """'steps', 'tokens' or 'time': what the schedule's fraction is measured in."""
        if self.steps is not None:
            return "steps"
        if self.tokens is not None:
            return "tokens"
        return "time"


ENGINES = ("auto", "mlx", "numpy")


# Named sizes from ~0.3M to ~30M parameters at the default 4096-token vocabulary.
PRESETS: dict[str, ModelConfig] = {
    "nano": ModelConfig(d_model=64, n_layers=2, n_heads=2),
    "micro": ModelConfig(d_model=96, n_layers=3, n_heads=3),
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4),
    "mini": ModelConfig(d_model=192, n_layers=4, n_heads=6),
    "small": ModelConfig(d_model=256, n_layers=6, n_heads=8),
    "medium": ModelConfig(d_model=384, n_layers=8, n_heads=6),
    "base": ModelConfig(d_model=512, n_layers=8, n_heads=8),
}
DEFAULT_PRESET = "tiny"


def _named(table: dict[str, Any], kind: str, name: str) -> Any:
    """table[name]; a ConfigError listing the choices for an unknown name."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(table)}") from None


def preset(name: str) -> ModelConfig:
    """The named preset; a ConfigError listing the choices for an unknown name."""
    return _named(PRESETS, "preset", name)


def preset_summary(name: str, batch_size: int | None = None) -> dict[str, Any]:
    """Shape and cost facts of a preset (what `tinylm presets` prints), training memory at
    `batch_size` (default: the training default)."""
    cfg = preset(name)
    batch = TrainConfig.batch_size if batch_size is None else batch_size
    return {**cfg.to_dict(), "params": cfg.n_params, "flops_per_token": cfg.flops_per_token(),
            "memory_bytes": cfg.training_memory_bytes(batch)}


# ----- recipes: architecture options + optimizer + schedule, on top of a size preset -----------

ARCHITECTURE_FIELDS = ("position", "norm", "mlp", "mlp_hidden", "qk_norm", "tie_embeddings",
                       "zero_init_residual", "init_std")
SCHEDULE_FIELDS = ("schedule", "warmup", "decay", "final_lr_frac")


@dataclass(frozen=True)
class Recipe:
    """Everything about how to train except the model's size and the budget.

    `model` holds ModelConfig architecture fields (ARCHITECTURE_FIELDS), `optim` the optimizer
    and `train` TrainConfig schedule fields (SCHEDULE_FIELDS) plus, optionally, batch_size.
    """

    model: dict[str, Any]
    optim: OptimConfig
    train: dict[str, Any]

    def apply(self, model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, OptimConfig,
                                                                      TrainConfig]:
        """The recipe on a sized model and a budgeted training config."""
        return model.with_(**self.model), self.optim, replace(train, **self.train)


def _default_recipe() -> Recipe:
    # The dataclass defaults are the default recipe: one place, no copy to drift.
    m, t = ModelConfig(), TrainConfig()
    return Recipe(model={k: getattr(m, k) for k in ARCHITECTURE_FIELDS}, optim=OptimConfig(),
                  train={k: getattr(t, k) for k in SCHEDULE_FIELDS})


RECIPES: dict[str, Recipe] = {
    "default": _default_recipe(),
    # nanoGPT's GPT-2 recipe in our code: learned absolute positions, LayerNorm (no bias), GELU,
    # tied head, AdamW (0.9, 0.95), weight decay 0.1, linear warm-up then cosine decay to a
    # tenth of the peak, N(0, 0.02) init with residual projections scaled by 1/sqrt(2·layers).
    # Its peak rate is the best the first screen found at this scale (nanoGPT's own 6e-4 is for
    # 124M parameters), so the baseline is not handicapped by a rate tuned for another size.
    "nanogpt": Recipe(
        model=dict(position="learned", norm="layernorm", mlp="gelu", mlp_hidden=None,
                   qk_norm=False, tie_embeddings=True, zero_init_residual=False, init_std=0.02),
        optim=OptimConfig(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0,
                          optimizer="adamw"),
        train=dict(schedule="cosine", warmup=0.03, final_lr_frac=0.1)),  # decay: WSD only
}
DEFAULT_RECIPE = "default"


def recipe(name: str) -> Recipe:
    """The named recipe; a ConfigError listing the choices for an unknown name."""
    return _named(RECIPES, "recipe", name)


def format_count(n: float) -> str:
    """1234567 -> '1.23M' (parameters, tokens)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
