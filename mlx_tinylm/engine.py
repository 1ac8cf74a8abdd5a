"""Training engines behind one small interface, so the loop does not care which one runs.

- `MlxEngine`: the compiled MLX step (Metal, CUDA or CPU).
- `FastNumpyEngine`: the fast float32 NumPy engine (fastnp.py), the fastest on small CPUs.
- `NumpyEngine`: the NumPy reference implementation (slow, obviously correct).

Both exchange weights and optimizer state as flat name -> NumPy array dicts (the safetensors
names), so checkpoints are interchangeable between engines.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Protocol

import numpy as np

from .config import ModelConfig, OptimConfig


class Engine(Protocol):
    name: str
    cfg: ModelConfig

    def step(self, inputs: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        """One optimizer step at learning rate `lr`; returns (loss, grad norm before clipping)."""
        ...

    def eval_loss(self, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
        """Sum of next-token cross-entropy (nats) over the targets where `mask` is true."""
        ...

    def weights(self) -> dict[str, np.ndarray]: ...

    def optimizer_state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, weights: dict[str, np.ndarray],
                   optimizer: dict[str, np.ndarray] | None) -> None: ...

    def peak_memory_bytes(self) -> int: ...


def process_peak_rss_bytes() -> int:
    """Peak resident memory of this process (since the last `reset_peak_rss` on Linux)."""
    try:
        with open("/proc/self/status") as f:  # VmHWM: the peak that clear_refs resets
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> None:
    """Start measuring the peak anew from the current resident memory (Linux; else a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def current_rss_bytes() -> int:
    """Resident memory now (Linux /proc); the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return process_peak_rss_bytes()


class MlxEngine:
    name = "mlx"

    def __init__(self, cfg: ModelConfig, opt: OptimConfig, seed: int = 0,
                 weights: dict[str, np.ndarray] | None = None,
                 optimizer: dict[str, np.ndarray] | None = None, compile: bool = True):
        import mlx.core as mx

        from .model import GPT, batch_streams, make_optimizer, make_train_step, split_rows
        from .model import token_losses as model_token_losses

        self.mx = mx
        self.cfg = cfg
        mx.random.seed(seed)
        self.model = GPT(cfg)
        self.model.init_weights(seed)
        self.optimizer = make_optimizer(opt)
        self.optimizer.init(self.model.trainable_parameters())
        # Load before compiling: the compiled step holds the very containers it was built with.
        if weights is not None:
            self.load_state(weights, optimizer)
        self._step = make_train_step(self.model, self.optimizer, opt.grad_clip, compile=compile)

        model = self.model
        streams = batch_streams()  # evaluation shares the batch across streams like the step

        def token_losses(inputs: mx.array, targets: mx.array) -> mx.array:
            return split_rows(lambda x, y: model_token_losses(model, x, y), streams, inputs,
                              targets)

        # The weights must be compile inputs, or the trace would freeze them as constants.
        self._token_losses = (mx.compile(token_losses, inputs=[model.state]) if compile
                              else token_losses)

    def step(self, inputs: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        mx = self.mx
        self.optimizer.learning_rate = lr
        loss, norm = self._step(mx.array(inputs), mx.array(targets))
        mx.eval(loss, norm, self.model.state, self.optimizer.state)  # the one eval per step
        return loss.item(), norm.item()

    def eval_loss(self, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
        mx = self.mx
        losses = self._token_losses(mx.array(inputs), mx.array(targets))
        total = mx.sum(losses * mx.array(mask.astype(np.float32)))
        return total.item()

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.model.named_weights().items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        from mlx.utils import tree_flatten

        return {k: np.array(v) for k, v in tree_flatten(self.optimizer.state)}

    def load_state(self, weights: dict[str, np.ndarray],
                   optimizer: dict[str, np.ndarray] | None) -> None:
        mx = self.mx
        self.model.load_named_weights({k: mx.array(v) for k, v in weights.items()})
        if optimizer:
            _assign_leaves(self.optimizer.state, {k: mx.array(v) for k, v in optimizer.items()})
        mx.eval(self.model.state, self.optimizer.state)

    def peak_memory_bytes(self) -> int:
        if self.mx.default_device().type == self.mx.gpu:
            return int(self.mx.get_peak_memory())
        # On the CPU backend MLX's own counter misses BLAS buffers; the process peak is honest.
        return max(int(self.mx.get_peak_memory()), process_peak_rss_bytes())


def _assign_leaves(tree: dict | list, flat: dict) -> None:
    """Write flat 'a.0.b' -> value entries into an existing nested dict/list tree, in place."""
    for name, value in flat.items():
        node = tree
        *path, last = name.split(".")
        try:
            for key in path:
                node = node[int(key)] if isinstance(node, list) else node[key]
            key = int(last) if isinstance(node, list) else last
            if isinstance(node, dict) and key not in node:
                raise KeyError(last)
            if tuple(getattr(node[key], "shape", ())) != tuple(value.shape):
                raise ValueError(f"shape {tuple(value.shape)}")  # a wrong-shape moment
            node[key] = value
        except (KeyError, IndexError, ValueError, TypeError):
            from .checkpoint import CheckpointError

            raise CheckpointError(f"optimizer state entry {name!r} does not match this model; "
                                  "the checkpoint belongs to a different configuration") from None


class NumpyEngine:
    """The NumPy engine: the reference implementation (float32), trained step by step."""

    name = "numpy"

    def __init__(self, cfg: ModelConfig, opt: OptimConfig, seed: int = 0,
                 weights: dict[str, np.ndarray] | None = None,
                 optimizer: dict[str, np.ndarray] | None = None):
        from . import reference

        _require_adamw(opt)
        self.ref = reference
        self.cfg = cfg
        self.opt = opt
        self.model = reference.GPT(cfg, dtype=np.float32, seed=seed)
        self.optimizer = reference.AdamW(opt)
        if weights is not None:
            self.load_state(weights, optimizer)

    def step(self, inputs: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        loss, norm = self.ref.train_step(self.model, self.optimizer, inputs, targets, lr,
                                         self.opt.grad_clip)
        return float(loss), float(norm)

    def eval_loss(self, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
        logits = self.model.forward(inputs).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits).sum(axis=-1))
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return float(((logz - picked) * mask).sum())

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, dtype=np.float32) for k, v in self.model.weights.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.optimizer.state_dict().items()}

    def load_state(self, weights: dict[str, np.ndarray],
                   optimizer: dict[str, np.ndarray] | None) -> None:
        try:
            for name, value in weights.items():
                if self.model.weights[name].shape != value.shape:
                    raise ValueError(f"{name} has shape {value.shape}")
                self.model.weights[name][...] = value
            if optimizer:
                self.optimizer.load_state_dict(optimizer)
                for name, m in self.optimizer.m.items():
                    if m.shape != self.model.weights[name].shape:
                        raise ValueError(f"optimizer moment of {name} has shape {m.shape}")
        except (KeyError, ValueError) as err:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"the checkpoint does not match this model ({err}); it belongs "
                                  "to a different configuration") from None

    def peak_memory_bytes(self) -> int:
        return process_peak_rss_bytes()


class FastNumpyEngine:
    """fastnp.py: two threads on halves of the batch, flat buffers; same model as MLX."""

    name = "numpy"

    def __init__(self, cfg: ModelConfig, opt: OptimConfig, seed: int = 0,
                 weights: dict[str, np.ndarray] | None = None,
                 optimizer: dict[str, np.ndarray] | None = None):
        from . import fastnp

        _require_adamw(opt)

        self.fastnp = fastnp
        self.cfg = cfg
        self.opt = opt
        self.model = fastnp.GPT(cfg, weights, seed=seed)
        self.optimizer = fastnp.AdamW(opt)
        if optimizer:
            fastnp.load_optimizer_state_dict(self.model, self.optimizer, optimizer)
        self._step = fastnp.make_train_step(self.model, self.optimizer, opt.grad_clip)

    def step(self, inputs: np.ndarray, targets: np.ndarray, lr: float) -> tuple[float, float]:
        self.optimizer.learning_rate = lr
        return self._step(inputs, targets)

    def eval_loss(self, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
        losses = self.model.token_losses(inputs, targets)
        return float(np.sum(losses.astype(np.float64) * mask))

    def weights(self) -> dict[str, np.ndarray]:
        return self.model.named_weights()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.fastnp.optimizer_state_dict(self.model, self.optimizer)

    def load_state(self, weights: dict[str, np.ndarray],
                   optimizer: dict[str, np.ndarray] | None) -> None:
        self.model.load_named_weights(weights)
        if optimizer:
            self.fastnp.load_optimizer_state_dict(self.model, self.optimizer, optimizer)

    def peak_memory_bytes(self) -> int:
        return process_peak_rss_bytes()


def _require_adamw(opt: OptimConfig) -> None:
    """The NumPy engines implement AdamW only."""
    if opt.optimizer != "adamw":
        from .errors import TinyLMError

        raise TinyLMError(f"the NumPy engine implements AdamW only, not {opt.optimizer}; "
                          "use --engine mlx")


def fast_numpy_supports(cfg: ModelConfig) -> bool:
    """fastnp implements the default architecture and initialisation: RoPE, RMSNorm,
    SwiGLU/ReLU², no QK-norm, no zero-initialised projections."""
    return (cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp in ("swiglu", "relu2")
            and not cfg.qk_norm and not cfg.zero_init_residual)


def make_engine(name: str, cfg: ModelConfig, opt: OptimConfig, seed: int = 0,
                weights: dict[str, np.ndarray] | None = None,
                optimizer: dict[str, np.ndarray] | None = None) -> Engine:
    """Build the named engine ('mlx' or 'numpy'), optionally from saved state."""
    if name == "numpy" and fast_numpy_supports(cfg):
        return FastNumpyEngine(cfg, opt, seed, weights, optimizer)
    if name in ("numpy", "reference"):  # the reference runs every model option, slowly
        return NumpyEngine(cfg, opt, seed, weights, optimizer)
    return MlxEngine(cfg, opt, seed, weights, optimizer)
