"""A fast float32 NumPy CPU engine for the mlx-tinylm GPT: same parameters, same math as model.py.

`reference.py` is the obviously-correct oracle; this module trades simplicity for speed on small
CPUs, where it outruns both MLX's CPU backend and PyTorch eager (benchmarks/NOTES.md). The tricks:

- **One thread per core, each on shares of the batch**, with BLAS at one thread: NumPy releases
  the GIL inside ufuncs and matmuls, so the threads keep every core busy on everything — the
  norms, softmax and activations too, not only the matmuls a threaded BLAS would parallelise.
  Shares (two per thread) are handed out as threads free up, so a core slowed by other work
  holds the step back less; each thread sums its shares' gradients, then the threads' sums add.
- **Preallocated buffers** written with `out=`: no large temporaries, no page faults per step.
- **RoPE as one complex multiply.** q/k weight rows are stored internally in an interleaved
  order, (x1[0], x2[0], x1[1], x2[1], ...) per head, so a head viewed as complex64 is
  `x1 + i·x2` and the non-interleaved ("rotate half") rotation of model.py is a multiply by
  `exp(i·angle)`. The same permutation of q and k leaves every dot product q·k unchanged; rows
  are permuted on the way in and back on the way out, so the external weights are identical.
  The 1/sqrt(head_dim) attention scale is folded into the query rotation.
- **Causal attention in query blocks**: block j multiplies only the keys it can see, so fully
  masked score blocks are never computed (25% fewer at T=256 with 128-row blocks).
- **Head and cross-entropy in row chunks**: logits, softmax and their gradient are formed a few
  hundred rows at a time and consumed at once, so the (tokens × vocab) logits never exist.
- **One flat parameter buffer** (matrices first, then norm gains): gradient reduction, clipping
  and AdamW are a handful of whole-array operations.

Public API (mirrors reference.py): `GPT(cfg, weights)`, `.loss_and_grads(inputs, targets)`,
`.logits(tokens)`, `.loss(inputs, targets)`, `AdamW(opt_cfg).update(params, grads, lr)`,
`clip_grad_norm`, and `make_train_step(model, optimizer, grad_clip)` for the fast flat path.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# ATTN_BLOCK: query rows per causal attention block; HEAD_CHUNK_BYTES: logits chunk of the
# head + cross-entropy (512 rows at vocab 4096). In config.py, whose memory estimate counts them.
from .config import ATTN_BLOCK, HEAD_CHUNK_BYTES, ModelConfig, OptimConfig

F32 = np.float32
ACT_ROWS = 128  # SwiGLU elementwise work in row chunks that fit in L2
SHARES_PER_WORKER = 2  # batch shares per thread, handed out as threads become free
RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")


# ----- BLAS threads ------------------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_fns: tuple[Callable, Callable] | None | bool = False  # False: not looked up yet


def _numpy_openblas() -> tuple[Callable, Callable] | None:
    """(get, set) thread-count functions of the OpenBLAS that NumPy uses, if it bundles one."""
    global _blas_fns
    if _blas_fns is not False:
        return _blas_fns  # type: ignore[return-value]
    _blas_fns = None
    libs_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", "_64_"),
                               ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype = ctypes.c_int
                set_.argtypes = [ctypes.c_int]
                _blas_fns = (get, set_)
                return _blas_fns
    return None


def can_pin_blas_threads() -> bool:
    """Whether NumPy's BLAS thread count can be set (bundled OpenBLAS); else workers stay at 1."""
    return _numpy_openblas() is not None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the body with NumPy's OpenBLAS at `n` threads (no-op when it cannot be controlled)."""
    fns = _numpy_openblas()
    if fns is None:
        yield
        return
    get, set_ = fns
    with _blas_lock:
        old = get()
        set_(n)
        try:
            yield
        finally:
            set_(old)


def default_workers() -> int:
    """One thread per core (up to 8) when BLAS can be pinned to one thread, else one thread with
    a threaded BLAS."""
    cores = os.cpu_count() or 1
    return min(cores, 8) if can_pin_blas_threads() else 1


# ----- layout ------------------------------------------------------------------------------------

def rope_permutation(cfg: ModelConfig) -> np.ndarray:
    """Row order taking q/k weights from the rotate-half layout to the interleaved one.

    internal = external[perm]: per head, internal row 2i is external row i (x1) and internal
    row 2i+1 is external row head_dim/2 + i (x2).
    """
    hd, half = cfg.head_dim, cfg.head_dim // 2
    per_head = np.empty(hd, dtype=np.int64)
    per_head[0::2] = np.arange(half)
    per_head[1::2] = half + np.arange(half)
    return (np.arange(cfg.n_heads)[:, None] * hd + per_head[None, :]).reshape(-1)


def rope_rotation(cfg: ModelConfig, positions: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """complex64 (len(positions), head_dim/2): scale·exp(i·pos·freq), freq_j = base^(-2j/hd)."""
    half = cfg.head_dim // 2
    freq = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.head_dim)
    angles = positions.astype(np.float64)[:, None] * freq[None, :]
    return (scale * np.exp(1j * angles)).astype(np.complex64)


@dataclass(frozen=True)
class _Slot:
    """Where one internal tensor lives in the flat buffer."""

    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Layout:
    """The flat parameter buffer: every matrix (decayed), then every norm gain (not decayed)."""

    def __init__(self, cfg: ModelConfig):
        d, h, v = cfg.d_model, cfg.hidden, cfg.vocab_size
        self.cfg = cfg
        self.slots: dict[str, _Slot] = {}
        matrices: list[tuple[str, tuple[int, ...]]] = []
        for i in range(cfg.n_layers):
            matrices += [(f"{i}.wqkv", (3 * d, d)), (f"{i}.wo", (d, d)),
                         (f"{i}.wup", ((2 if cfg.mlp == "swiglu" else 1) * h, d)),
                         (f"{i}.wdown", (d, h))]
        matrices.append(("embed", (v, d)))
        if not cfg.tie_embeddings:
            matrices.append(("head", (v, d)))
        gains = [(f"{i}.{n}", (d,)) for i in range(cfg.n_layers) for n in ("ln1", "ln2")]
        gains.append(("norm", (d,)))
        offset = 0
        for name, shape in matrices:
            self.slots[name] = _Slot(offset, shape)
            offset += self.slots[name].size
        self.n_decayed = offset
        for name, shape in gains:
            self.slots[name] = _Slot(offset, shape)
            offset += self.slots[name].size
        self.size = offset
        self.perm = rope_permutation(cfg)
        self.inv_perm = np.argsort(self.perm)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {name: flat[s.offset:s.offset + s.size].reshape(s.shape)
                for name, s in self.slots.items()}

    def _external(self) -> Iterator[tuple[str, str, slice, bool]]:
        """(external name, internal name, row slice, q/k permuted) for every parameter."""
        cfg, d, h = self.cfg, self.cfg.d_model, self.cfg.hidden
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", f"{i}.ln1", slice(None), False
            yield p + "self_attn.q_proj.weight", f"{i}.wqkv", slice(0, d), True
            yield p + "self_attn.k_proj.weight", f"{i}.wqkv", slice(d, 2 * d), True
            yield p + "self_attn.v_proj.weight", f"{i}.wqkv", slice(2 * d, 3 * d), False
            yield p + "self_attn.o_proj.weight", f"{i}.wo", slice(None), False
            yield p + "post_attention_layernorm.weight", f"{i}.ln2", slice(None), False
            if cfg.mlp == "swiglu":
                yield p + "mlp.gate_proj.weight", f"{i}.wup", slice(0, h), False
                yield p + "mlp.up_proj.weight", f"{i}.wup", slice(h, 2 * h), False
            else:
                yield p + "mlp.up_proj.weight", f"{i}.wup", slice(None), False
            yield p + "mlp.down_proj.weight", f"{i}.wdown", slice(None), False
        yield "model.embed_tokens.weight", "embed", slice(None), False
        yield "model.norm.weight", "norm", slice(None), False
        if not cfg.tie_embeddings:
            yield "lm_head.weight", "head", slice(None), False

    def pack(self, named: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """External name -> array dict into a flat internal buffer."""
        expected = self.cfg.param_shapes()
        missing, extra = sorted(set(expected) - set(named)), sorted(set(named) - set(expected))
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        flat = np.empty(self.size, dtype=F32) if out is None else out
        views = self.views(flat)
        for ext, internal, rows, permuted in self._external():
            value = np.asarray(named[ext], dtype=F32)
            if value.shape != expected[ext]:
                raise ValueError(f"weight {ext} has shape {value.shape}, "
                                 f"config expects {expected[ext]}")
            views[internal][rows] = value[self.perm] if permuted else value
        return flat

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """A flat internal buffer back into external name -> array (copies)."""
        views = self.views(flat)
        out = {}
        for ext, internal, rows, permuted in self._external():
            value = views[internal][rows]
            out[ext] = value[self.inv_perm] if permuted else value.copy()
        return out


def init_weights(cfg: ModelConfig, seed: int | None = None) -> dict[str, np.ndarray]:
    """model.py's initialisation: N(0, init_std), residual projections /sqrt(2·layers), gains 1."""
    rng = np.random.default_rng(seed)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    weights = {}
    for name, shape in cfg.param_shapes().items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, dtype=F32)
        else:
            std = residual_std if any(p in name for p in RESIDUAL_PROJECTIONS) else cfg.init_std
            weights[name] = (std * rng.standard_normal(shape)).astype(F32)
    return weights


# ----- one worker: forward and backward for a share of the batch --------------------------------

def _rms_norm(x: np.ndarray, gain: np.ndarray, eps: float, xn: np.ndarray, r: np.ndarray,
              out: np.ndarray) -> None:
    """out = x / sqrt(mean(x²) + eps) · gain; keeps xn = x·r and r for the backward."""
    np.multiply(x, x, out=xn)
    np.mean(xn, axis=1, keepdims=True, out=r)
    r += eps
    np.sqrt(r, out=r)
    np.reciprocal(r, out=r)
    np.multiply(x, r, out=xn)
    np.multiply(xn, gain, out=out)


def _rms_norm_backward(dy: np.ndarray, gain: np.ndarray, xn: np.ndarray, r: np.ndarray,
                       dgain: np.ndarray, dx_acc: np.ndarray, tmp: np.ndarray,
                       col: np.ndarray) -> None:
    """dx_acc += d(input); dgain = sum(dy·xn). tmp (N, d) and col (N, 1) are scratch."""
    np.multiply(dy, xn, out=tmp)
    np.sum(tmp, axis=0, out=dgain)
    np.multiply(dy, gain, out=tmp)  # d xn
    # d x = r · (dxn - xn · mean(dxn · xn))
    np.multiply(tmp, xn, out=dy)  # dy is free now: use it as scratch
    np.mean(dy, axis=1, keepdims=True, out=col)
    np.multiply(xn, col, out=dy)
    np.subtract(tmp, dy, out=tmp)
    tmp *= r
    dx_acc += tmp


class _Worker:
    """Buffers and code for forward + backward of a (b, T) share of the batch."""

    def __init__(self, layout: Layout, b: int, t: int):
        cfg = layout.cfg
        self.cfg, self.b, self.t = cfg, b, t
        d, h, nh, hd = cfg.d_model, cfg.hidden, cfg.n_heads, cfg.head_dim
        n = b * t
        self.n = n
        up = 2 * h if cfg.mlp == "swiglu" else h
        z = np.empty
        # forward activations kept for the backward pass, per layer
        self.layers = []
        for _ in range(cfg.n_layers):
            self.layers.append({
                "xn1": z((n, d), F32), "r1": z((n, 1), F32),
                "h1": z((n, d), F32), "q": z((b, nh, t, hd), F32), "k": z((b, nh, t, hd), F32),
                "v": z((b, nh, t, hd), F32), "o": z((b, t, nh, hd), F32),
                "p": [z((b, nh, stop - start, stop), F32) for start, stop in self.blocks()],
                "prow": [z((b, nh, stop - start, 1), F32) for start, stop in self.blocks()],
                "xn2": z((n, d), F32), "r2": z((n, 1), F32), "h2": z((n, d), F32),
                "up": z((n, up), F32), "act": z((n, h), F32),
                "sig": z((n, h), F32) if cfg.mlp == "swiglu" else None,
                "silu": z((n, h), F32) if cfg.mlp == "swiglu" else None,
            })
        self.x = z((n, d), F32)  # residual stream / its gradient
        self.xnf, self.rf, self.hf = z((n, d), F32), z((n, 1), F32), z((n, d), F32)
        self.qkv = z((n, 3 * d), F32)
        self.tmp_d, self.tmp_d2 = z((n, d), F32), z((n, d), F32)
        self.col = z((n, 1), F32)
        self.tmp_up = z((n, up), F32)
        self.tmp_h = z((n, h), F32)
        self.dq, self.dk, self.dv = (z((b, nh, t, hd), F32) for _ in range(3))
        self.kv_tmp = z((b, nh, t, hd), F32)
        self.dp = [z((b, nh, stop - start, stop), F32) for start, stop in self.blocks()]
        self.rowdot = z((b, t, nh), F32)
        self.chunk = max(8, min(n, HEAD_CHUNK_BYTES // (4 * cfg.vocab_size)))
        self.logits = z((self.chunk, cfg.vocab_size), F32)
        self.rowtmp = z((self.chunk,), F32)
        self.head_grad_tmp = z((cfg.vocab_size, d), F32)
        self.masks = [np.triu(np.full((stop - start, stop - start), -np.inf, dtype=F32), k=1)
                      for start, stop in self.blocks()]
        self.layout = layout
        self.grad_views: dict[str, np.ndarray] = {}  # set by bind_grad

    def bind_grad(self, flat: np.ndarray) -> None:
        """Write this share's gradient into `flat` (a buffer in the layout's order)."""
        self.grad_views = self.layout.views(flat)

    def blocks(self) -> list[tuple[int, int]]:
        return [(s, min(s + ATTN_BLOCK, self.t)) for s in range(0, self.t, ATTN_BLOCK)]

    # -- attention ---------------------------------------------------------------------------
    def _attention(self, L: dict, rope_q: np.ndarray, rope_k: np.ndarray) -> None:
        b, t, nh, hd = self.b, self.t, self.cfg.n_heads, self.cfg.head_dim
        qkv = self.qkv.reshape(b, t, 3, nh, hd)
        qkv_c = qkv.view(np.complex64)  # (b, t, 3, nh, hd/2)
        q, k, v = L["q"], L["k"], L["v"]
        np.multiply(qkv_c[:, :, 0], rope_q[None, :, None, :],
                    out=q.view(np.complex64).transpose(0, 2, 1, 3))
        np.multiply(qkv_c[:, :, 1], rope_k[None, :, None, :],
                    out=k.view(np.complex64).transpose(0, 2, 1, 3))
        np.copyto(v.transpose(0, 2, 1, 3), qkv[:, :, 2])
        o = L["o"].transpose(0, 2, 1, 3)  # (b, nh, t, hd) view of the (b, t, nh, hd) buffer
        parts = zip(self.blocks(), L["p"], L["prow"], self.masks, strict=True)
        for (start, stop), p, prow, mask in parts:
            np.matmul(q[:, :, start:stop], k[:, :, :stop].swapaxes(2, 3), out=p)
            p[..., start:stop] += mask
            _softmax_rows(p, prow)
            np.matmul(p, v[:, :, :stop], out=o[:, :, start:stop])

    def _attention_backward(self, L: dict, do_flat: np.ndarray, rope_q: np.ndarray,
                            rope_k: np.ndarray, dqkv: np.ndarray) -> None:
        """do_flat: (n, d) gradient of the attention output (o_proj input); fills dqkv."""
        b, t, nh, hd = self.b, self.t, self.cfg.n_heads, self.cfg.head_dim
        do = do_flat.reshape(b, t, nh, hd)
        # rowdot = sum(dO · O) per (b, t, head) — equals sum(dP · P) per softmax row
        np.einsum("btnh,btnh->btn", do, L["o"], out=self.rowdot)
        do_t, rowdot = do.transpose(0, 2, 1, 3), self.rowdot.transpose(0, 2, 1)
        q, k, v = L["q"], L["k"], L["v"]
        dq, dk, dv = self.dq, self.dk, self.dv
        blocks = self.blocks()
        # last block sees every key: it writes dk, dv; earlier blocks add into their prefix
        for j in reversed(range(len(blocks))):
            start, stop = blocks[j]
            p, dp = L["p"][j], self.dp[j]
            first = j == len(blocks) - 1
            tgt_v = dv[:, :, :stop] if first else self.kv_tmp[:, :, :stop]
            np.matmul(p.swapaxes(2, 3), do_t[:, :, start:stop], out=tgt_v)
            if not first:
                dv[:, :, :stop] += tgt_v
            np.matmul(do_t[:, :, start:stop], v[:, :, :stop].swapaxes(2, 3), out=dp)
            dp -= rowdot[:, :, start:stop, None]
            dp *= p  # dS
            np.matmul(dp, k[:, :, :stop], out=dq[:, :, start:stop])
            tgt_k = dk[:, :, :stop] if first else self.kv_tmp[:, :, :stop]
            np.matmul(dp.swapaxes(2, 3), q[:, :, start:stop], out=tgt_k)
            if not first:
                dk[:, :, :stop] += tgt_k
        g = dqkv.reshape(b, t, 3, nh, hd)
        g_c = g.view(np.complex64)
        np.multiply(dq.view(np.complex64).transpose(0, 2, 1, 3), np.conj(rope_q)[None, :, None, :],
                    out=g_c[:, :, 0])
        np.multiply(dk.view(np.complex64).transpose(0, 2, 1, 3), np.conj(rope_k)[None, :, None, :],
                    out=g_c[:, :, 1])
        np.copyto(g[:, :, 2], dv.transpose(0, 2, 1, 3))

    # -- whole model -------------------------------------------------------------------------
    def forward(self, W: dict[str, np.ndarray], tokens: np.ndarray, rope_q: np.ndarray,
                rope_k: np.ndarray) -> None:
        """Runs every layer and the final norm; leaves the normed output in self.hf."""
        eps = self.cfg.norm_eps
        x = self.x
        np.take(W["embed"], tokens.reshape(-1), axis=0, out=x)
        for i, L in enumerate(self.layers):
            _rms_norm(x, W[f"{i}.ln1"], eps, L["xn1"], L["r1"], L["h1"])
            np.matmul(L["h1"], W[f"{i}.wqkv"].T, out=self.qkv)
            self._attention(L, rope_q, rope_k)
            np.matmul(L["o"].reshape(self.n, -1), W[f"{i}.wo"].T, out=self.tmp_d)
            x += self.tmp_d
            _rms_norm(x, W[f"{i}.ln2"], eps, L["xn2"], L["r2"], L["h2"])
            np.matmul(L["h2"], W[f"{i}.wup"].T, out=L["up"])
            self._activation(L)
            np.matmul(L["act"], W[f"{i}.wdown"].T, out=self.tmp_d)
            x += self.tmp_d
        _rms_norm(x, W["norm"], eps, self.xnf, self.rf, self.hf)

    def _activation(self, L: dict) -> None:
        h = self.cfg.hidden
        if self.cfg.mlp != "swiglu":
            np.maximum(L["up"], 0.0, out=L["act"])
            np.square(L["act"], out=L["act"])
            return
        # In row chunks that stay in L2: each pass below then reads from cache, not memory.
        for r0 in range(0, self.n, ACT_ROWS):
            r1 = min(r0 + ACT_ROWS, self.n)
            gate, up = L["up"][r0:r1, :h], L["up"][r0:r1, h:]
            sig, silu, act = L["sig"][r0:r1], L["silu"][r0:r1], L["act"][r0:r1]
            np.negative(gate, out=sig)
            np.exp(sig, out=sig)
            sig += 1.0
            np.reciprocal(sig, out=sig)  # sigmoid(gate)
            np.multiply(gate, sig, out=silu)
            np.multiply(silu, up, out=act)

    def _activation_backward(self, L: dict, dact: np.ndarray) -> None:
        """Fills self.tmp_up with the gradient of the up (and gate) projection outputs."""
        h = self.cfg.hidden
        if self.cfg.mlp != "swiglu":
            # d/du relu(u)² = 2·relu(u)
            np.maximum(L["up"], 0.0, out=self.tmp_up)
            self.tmp_up *= 2.0
            self.tmp_up *= dact
            return
        for r0 in range(0, self.n, ACT_ROWS):
            r1 = min(r0 + ACT_ROWS, self.n)
            up, sig, silu = L["up"][r0:r1, h:], L["sig"][r0:r1], L["silu"][r0:r1]
            da = dact[r0:r1]
            dgate, dup = self.tmp_up[r0:r1, :h], self.tmp_up[r0:r1, h:]
            np.multiply(da, silu, out=dup)  # d up = dact · silu(gate)
            # d gate = dact · up · silu'(gate), silu' = sig + silu·(1 - sig)
            np.multiply(silu, sig, out=dgate)
            np.subtract(silu, dgate, out=dgate)
            dgate += sig
            dgate *= up
            dgate *= da

    def head_loss(self, W: dict[str, np.ndarray], targets: np.ndarray, n_total: int,
                  grad: bool, token_losses: np.ndarray | None = None) -> float:
        """Sum of per-token losses; with `grad`, the head gradient into the bound grad and
        d(final norm output) into self.tmp_d (loss scaled by 1/n_total). `token_losses`
        (n,) receives each token's loss when given."""
        head = W["embed"] if self.cfg.tie_embeddings else W["head"]
        targets = targets.reshape(-1)
        gview = self.grad_views["embed" if self.cfg.tie_embeddings else "head"] if grad else None
        total = 0.0
        for c0 in range(0, self.n, self.chunk):
            c1 = min(c0 + self.chunk, self.n)
            rows = c1 - c0
            z = self.logits[:rows]
            np.matmul(self.hf[c0:c1], head.T, out=z)
            m = self.rowtmp[:rows]
            np.max(z, axis=1, out=m)
            z -= m[:, None]
            idx = (np.arange(rows), targets[c0:c1])
            picked = z[idx]
            np.exp(z, out=z)
            np.sum(z, axis=1, out=m)
            row_loss = np.log(m, dtype=np.float64) - picked
            total += float(np.sum(row_loss))
            if token_losses is not None:
                token_losses[c0:c1] = row_loss
            if not grad:
                continue
            np.reciprocal(m, out=m)
            m *= 1.0 / n_total
            z *= m[:, None]
            z[idx] -= 1.0 / n_total
            np.matmul(z, head, out=self.tmp_d[c0:c1])
            if c0 == 0:
                np.matmul(z.T, self.hf[c0:c1], out=gview)
            else:
                np.matmul(z.T, self.hf[c0:c1], out=self.head_grad_tmp)
                gview += self.head_grad_tmp
        return total

    def backward(self, W: dict[str, np.ndarray], tokens: np.ndarray, rope_q: np.ndarray,
                 rope_k: np.ndarray) -> None:
        """Needs forward() and head_loss(grad=True) first; fills the bound gradient buffer."""
        G = self.grad_views
        dx = self.x  # the residual stream buffer now carries its gradient
        dx.fill(0.0)
        _rms_norm_backward(self.tmp_d, W["norm"], self.xnf, self.rf, G["norm"], dx,
                           self.tmp_d2, self.col)
        for i in reversed(range(self.cfg.n_layers)):
            L = self.layers[i]
            # MLP: x_out = x_mid + down(act(up(norm2(x_mid))))
            dact = self.tmp_h
            np.matmul(dx, W[f"{i}.wdown"], out=dact)
            np.matmul(dx.T, L["act"], out=G[f"{i}.wdown"])
            self._activation_backward(L, dact)
            np.matmul(self.tmp_up.T, L["h2"], out=G[f"{i}.wup"])
            np.matmul(self.tmp_up, W[f"{i}.wup"], out=self.tmp_d)
            _rms_norm_backward(self.tmp_d, W[f"{i}.ln2"], L["xn2"], L["r2"], G[f"{i}.ln2"], dx,
                               self.tmp_d2, self.col)
            # attention: x_mid = x_in + o_proj(attn(norm1(x_in)))
            do = self.tmp_d
            np.matmul(dx, W[f"{i}.wo"], out=do)
            np.matmul(dx.T, L["o"].reshape(self.n, -1), out=G[f"{i}.wo"])
            self._attention_backward(L, do, rope_q, rope_k, self.qkv)
            np.matmul(self.qkv.T, L["h1"], out=G[f"{i}.wqkv"])
            np.matmul(self.qkv, W[f"{i}.wqkv"], out=self.tmp_d)
            _rms_norm_backward(self.tmp_d, W[f"{i}.ln1"], L["xn1"], L["r1"], G[f"{i}.ln1"], dx,
                               self.tmp_d2, self.col)
        # embedding: scatter-add the input gradient into the token rows (a tied embedding
        # already holds the head's gradient)
        if not self.cfg.tie_embeddings:
            G["embed"].fill(0.0)
        _scatter_add_rows(G["embed"], tokens.reshape(-1), dx)


def _softmax_rows(p: np.ndarray, tmp: np.ndarray) -> None:
    """In-place softmax over the last axis (entries may be -inf, never a whole row)."""
    np.max(p, axis=-1, keepdims=True, out=tmp)
    p -= tmp
    np.exp(p, out=p)
    np.sum(p, axis=-1, keepdims=True, out=tmp)
    np.reciprocal(tmp, out=tmp)
    p *= tmp


def _scatter_add_rows(dst: np.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
    """dst[index[i]] += rows[i] for every i (repeated indices add up)."""
    order = np.argsort(index, kind="stable")
    sorted_idx = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    dst[sorted_idx[starts]] += np.add.reduceat(rows[order], starts, axis=0)


# ----- the model ---------------------------------------------------------------------------------

class GPT:
    """The mlx-tinylm GPT in fast float32 NumPy; weights are a flat internal buffer.

    `weights`: external name -> array (NumPy, MLX, anything np.asarray takes); None initialises
    them as model.py does (with `seed`). `workers`: threads, each on a share of the batch.
    """

    def __init__(self, cfg: ModelConfig, weights: dict | None = None, seed: int | None = None,
                 workers: int | None = None):
        self.config = cfg
        self.layout = Layout(cfg)
        self.flat = self.layout.pack(init_weights(cfg, seed) if weights is None else weights)
        self.W = self.layout.views(self.flat)
        self.n_workers = default_workers() if workers is None else max(1, int(workers))
        self.shares_per_worker = SHARES_PER_WORKER
        self._pool: ThreadPoolExecutor | None = None
        self._workers: dict[tuple[int, int], _Worker] = {}
        self._rope_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._grad_acc: list[np.ndarray] = []  # per thread
        self._grad_scratch: list[np.ndarray] = []
        self._used_slots: list[int] = [0]

    # -- weights -----------------------------------------------------------------------------
    def named_weights(self) -> dict[str, np.ndarray]:
        return self.layout.unpack(self.flat)

    def load_named_weights(self, weights: dict) -> None:
        self.layout.pack(weights, out=self.flat)

    # -- running -----------------------------------------------------------------------------
    def _shares(self, batch: int) -> list[tuple[int, int]]:
        """The batch in SHARES_PER_WORKER shares per worker: a worker that finishes first takes
        the next share, so a core slowed by other work holds the step back less."""
        parts = 1 if self.n_workers == 1 else min(batch, self.n_workers * self.shares_per_worker)
        edges = np.linspace(0, batch, parts + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def _worker(self, slot: int, b: int, t: int) -> _Worker:
        """Buffers of thread `slot` for a (b, t) share (kept for each share shape seen last)."""
        key = (slot, b)
        w = self._workers.get(key)
        if w is None or w.t != t:
            self._workers[key] = w = _Worker(self.layout, b, t)
        return w

    def _run(self, fn: Callable[[_Worker, int, int, int, bool], float], batch: int,
             t: int) -> list[float]:
        """fn(worker, a, b, slot, first) for every share [a, b) of the batch.

        `slot` is the thread (0 .. workers-1) running it; `first` marks a thread's first share
        of this call. Threads run with BLAS at one thread each.
        """
        shares = self._shares(batch)
        slots = min(self.n_workers, len(shares))
        for slot in range(slots):  # buffers made here, not concurrently in the threads
            for a, b in shares:
                self._worker(slot, b - a, t)
        if slots == 1:
            return [fn(self._worker(0, b - a, t), a, b, 0, i == 0)
                    for i, (a, b) in enumerate(shares)]
        pending = list(reversed(shares))
        lock = threading.Lock()

        def loop(slot: int) -> list[float]:
            out: list[float] = []
            while True:
                with lock:
                    if not pending:
                        return out
                    a, b = pending.pop()
                out.append(fn(self._worker(slot, b - a, t), a, b, slot, not out))

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n_workers, thread_name_prefix="fastnp")
        with blas_threads(1):
            futures = [self._pool.submit(loop, slot) for slot in range(slots)]
            self._used_slots = [slot for slot, f in enumerate(futures) if f.result()]
            return [x for f in futures for x in f.result()]

    def _ropes(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Rotations for positions 0..t-1: queries (with the 1/sqrt(head_dim) scale) and keys."""
        if t not in self._rope_cache:
            pos = np.arange(t)
            scale = 1 / math.sqrt(self.config.head_dim)
            self._rope_cache[t] = (rope_rotation(self.config, pos, scale),
                                   rope_rotation(self.config, pos))
        return self._rope_cache[t]

    def _check(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.asarray(inputs)
        if inputs.ndim != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {inputs.shape}")
        if inputs.shape[1] > self.config.context_length:
            raise ValueError(f"sequence length {inputs.shape[1]} exceeds the context length "
                             f"{self.config.context_length}")
        return inputs.astype(np.int64, copy=False)

    def flat_loss_and_grad(self, inputs: np.ndarray, targets: np.ndarray
                           ) -> tuple[float, np.ndarray]:
        """Mean loss and the gradient as a flat buffer in the internal layout (do not keep it:
        the next call overwrites it)."""
        inputs, targets = self._check(inputs), np.asarray(targets)
        batch, t = inputs.shape
        n_total = batch * t
        rope_q, rope_k = self._ropes(t)

        while len(self._grad_acc) < self.n_workers:
            self._grad_acc.append(np.empty(self.layout.size, dtype=F32))
            self._grad_scratch.append(np.empty(self.layout.size, dtype=F32))
        self._used_slots = [0]

        def run(w: _Worker, a: int, b: int, slot: int, first: bool) -> float:
            # a thread's first share writes its accumulator; later shares add into it
            w.bind_grad(self._grad_acc[slot] if first else self._grad_scratch[slot])
            w.forward(self.W, inputs[a:b], rope_q, rope_k)
            loss = w.head_loss(self.W, targets[a:b], n_total, grad=True)
            w.backward(self.W, inputs[a:b], rope_q, rope_k)
            if not first:
                self._grad_acc[slot] += self._grad_scratch[slot]
            return loss

        losses = self._run(run, batch, t)
        used = self._used_slots
        grad = self._grad_acc[used[0]]
        for slot in used[1:]:
            grad += self._grad_acc[slot]
        return sum(losses) / n_total, grad

    def loss_and_grads(self, inputs: np.ndarray, targets: np.ndarray
                       ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean next-token cross-entropy and name -> gradient (external names and layout)."""
        loss, grad = self.flat_loss_and_grad(inputs, targets)
        return loss, self.layout.unpack(grad)

    def loss(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Mean next-token cross-entropy, forward only."""
        inputs, targets = self._check(inputs), np.asarray(targets)
        batch, t = inputs.shape
        rope_q, rope_k = self._ropes(t)

        def run(w: _Worker, a: int, b: int, slot: int, first: bool) -> float:
            w.forward(self.W, inputs[a:b], rope_q, rope_k)
            return w.head_loss(self.W, targets[a:b], batch * t, grad=False)

        return sum(self._run(run, batch, t)) / (batch * t)

    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Next-token cross-entropy of every position, (B, T) float32, forward only."""
        inputs, targets = self._check(inputs), np.asarray(targets)
        batch, t = inputs.shape
        rope_q, rope_k = self._ropes(t)
        out = np.empty((batch, t), dtype=F32)

        def run(w: _Worker, a: int, b: int, slot: int, first: bool) -> float:
            w.forward(self.W, inputs[a:b], rope_q, rope_k)
            return w.head_loss(self.W, targets[a:b], batch * t, grad=False,
                               token_losses=out[a:b].reshape(-1))

        self._run(run, batch, t)
        return out

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, T, vocab) for int tokens (B, T)."""
        tokens = self._check(tokens)
        batch, t = tokens.shape
        rope_q, rope_k = self._ropes(t)
        head = self.W["embed"] if self.config.tie_embeddings else self.W["head"]
        out = np.empty((batch, t, self.config.vocab_size), dtype=F32)

        def run(w: _Worker, a: int, b: int, slot: int, first: bool) -> float:
            w.forward(self.W, tokens[a:b], rope_q, rope_k)
            np.matmul(w.hf, head.T, out=out[a:b].reshape(-1, self.config.vocab_size))
            return 0.0

        self._run(run, batch, t)
        return out

    # -- incremental decoding ----------------------------------------------------------------
    def decode(self, tokens: np.ndarray, cache: list | None) -> tuple[np.ndarray, list]:
        """Logits of the last position for tokens (B, T) appended after `cache` (None: empty).

        A plain single-threaded path with a growing per-layer key/value cache; for sampling and
        the generation benchmark, not training.
        """
        cfg, eps = self.config, self.config.norm_eps
        tokens = np.asarray(tokens, dtype=np.int64)
        b, t = tokens.shape
        nh, hd = cfg.n_heads, cfg.head_dim
        cache = [None] * cfg.n_layers if cache is None else cache
        offset = 0 if cache[0] is None else cache[0][0].shape[2]
        pos = np.arange(offset, offset + t)
        rope_q = rope_rotation(cfg, pos, 1 / math.sqrt(hd))
        rope_k = rope_rotation(cfg, pos)
        x = self.W["embed"][tokens].reshape(b * t, -1)

        def norm(v: np.ndarray, g: np.ndarray) -> np.ndarray:
            return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g

        for i in range(cfg.n_layers):
            qkv = (norm(x, self.W[f"{i}.ln1"]) @ self.W[f"{i}.wqkv"].T).reshape(b, t, 3, nh, hd)
            qkv_c = np.ascontiguousarray(qkv).view(np.complex64)
            q = (qkv_c[:, :, 0] * rope_q[None, :, None]).view(F32).transpose(0, 2, 1, 3)
            k = (qkv_c[:, :, 1] * rope_k[None, :, None]).view(F32).transpose(0, 2, 1, 3)
            v = qkv[:, :, 2].transpose(0, 2, 1, 3)
            if cache[i] is not None:
                k = np.concatenate([cache[i][0], k], axis=2)
                v = np.concatenate([cache[i][1], v], axis=2)
            cache[i] = (k, v)
            s = q @ k.swapaxes(2, 3)
            if t > 1:
                s = s + np.triu(np.full((t, offset + t), -np.inf, F32), k=offset + 1)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            o = (s @ v).transpose(0, 2, 1, 3).reshape(b * t, -1)
            x = x + o @ self.W[f"{i}.wo"].T
            up = norm(x, self.W[f"{i}.ln2"]) @ self.W[f"{i}.wup"].T
            if cfg.mlp == "swiglu":
                gate, up = up[:, :cfg.hidden], up[:, cfg.hidden:]
                act = gate / (1.0 + np.exp(-gate)) * up
            else:
                act = np.square(np.maximum(up, 0.0))
            x = x + act @ self.W[f"{i}.wdown"].T
        h = norm(x.reshape(b, t, -1)[:, -1], self.W["norm"])
        head = self.W["embed"] if cfg.tie_embeddings else self.W["head"]
        return h @ head.T, cache


# ----- optimizer and step ------------------------------------------------------------------------

def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float
                   ) -> tuple[dict[str, np.ndarray], float]:
    """Scale grads so their global norm is at most max_norm (as mlx.optimizers.clip_grad_norm);
    returns the clipped grads and the norm before clipping."""
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    scale = min(max_norm / (norm + 1e-6), 1.0)
    return {k: (g * F32(scale)).astype(F32) for k, g in grads.items()}, norm


class AdamW:
    """AdamW exactly as model.make_optimizer: bias-corrected, decoupled weight decay on matrices
    (ndim >= 2) only, the decay applied to the parameter before the Adam step."""

    def __init__(self, opt: OptimConfig):
        self.opt = opt
        self.learning_rate = opt.lr
        self.step = 0
        self.state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._flat_state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _coefficients(self, lr: float) -> tuple[float, float]:
        b1, b2 = self.opt.betas
        return lr / (1 - b1 ** self.step), 1 / math.sqrt(1 - b2 ** self.step)

    @staticmethod
    def _apply(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, tmp: np.ndarray,
               b1: float, b2: float, c1: float, c2: float, eps: float, decay: float) -> None:
        """In place: m, v moments; p = p·decay - c1·m / (sqrt(v)·c2 + eps)."""
        m *= F32(b1)
        np.multiply(g, F32(1 - b1), out=tmp)
        m += tmp
        v *= F32(b2)
        np.multiply(g, g, out=tmp)
        tmp *= F32(1 - b2)
        v += tmp
        if decay != 1.0:
            p *= F32(decay)
        np.sqrt(v, out=tmp)
        tmp *= F32(c2)
        tmp += F32(eps)
        np.divide(m, tmp, out=tmp)
        tmp *= F32(c1)
        p -= tmp

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
               lr: float | None = None) -> None:
        """Update name -> array params in place (the reference's dict interface)."""
        lr = self.learning_rate if lr is None else lr
        self.step += 1
        c1, c2 = self._coefficients(lr)
        b1, b2 = self.opt.betas
        for name, p in params.items():
            g = np.asarray(grads[name], dtype=F32)
            if name not in self.state:
                self.state[name] = (np.zeros_like(p), np.zeros_like(p))
            m, v = self.state[name]
            decay = 1 - lr * self.opt.weight_decay if p.ndim >= 2 else 1.0
            self._apply(p, g, m, v, np.empty_like(p), b1, b2, c1, c2, self.opt.eps, decay)

    def update_flat(self, flat: np.ndarray, grad: np.ndarray, n_decayed: int,
                    lr: float | None = None, workers: int = 1) -> None:
        """Update a flat buffer whose first `n_decayed` entries are decayed matrices."""
        lr = self.learning_rate if lr is None else lr
        if self._flat_state is None or self._flat_state[0].shape != flat.shape:
            self._flat_state = (np.zeros_like(flat), np.zeros_like(flat), np.empty_like(flat))
        m, v, tmp = self._flat_state
        self.step += 1
        c1, c2 = self._coefficients(lr)
        b1, b2 = self.opt.betas
        decay = 1 - lr * self.opt.weight_decay
        pieces = [(0, n_decayed, decay), (n_decayed, flat.size, 1.0)]
        if workers > 1:  # split the decayed part so two threads share the work
            half = n_decayed // 2
            pieces = [(0, half, decay), (half, n_decayed, decay), (n_decayed, flat.size, 1.0)]

        def run(piece: tuple[int, int, float]) -> None:
            a, b, dec = piece
            self._apply(flat[a:b], grad[a:b], m[a:b], v[a:b], tmp[a:b], b1, b2, c1, c2,
                        self.opt.eps, dec)

        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, pieces))
        else:
            for piece in pieces:
                run(piece)


FlatStep = Callable[[np.ndarray, np.ndarray], tuple[float, float]]


def make_train_step(model: GPT, optimizer: AdamW, grad_clip: float) -> FlatStep:
    """step(inputs, targets) -> (loss, grad_norm before clipping): forward, backward, clip and
    AdamW on the flat buffers. Set `optimizer.learning_rate` between calls to change the LR."""

    def step(inputs: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
        loss, grad = model.flat_loss_and_grad(inputs, targets)
        norm = math.sqrt(float(np.dot(grad.astype(np.float64), grad.astype(np.float64))))
        if grad_clip > 0:
            scale = min(grad_clip / (norm + 1e-6), 1.0)
            if scale < 1.0:
                grad *= F32(scale)
        optimizer.update_flat(model.flat, grad, model.layout.n_decayed,
                              workers=min(model.n_workers, 2))
        return loss, norm

    return step


# ----- optimizer state in the shared checkpoint format -------------------------------------------

def optimizer_state_dict(model: GPT, optimizer: AdamW) -> dict[str, np.ndarray]:
    """The flat AdamW state in the names MLX and reference.py use (`states.{0,1}...`), so a
    checkpoint moves freely between engines. Group 0 holds the decayed matrices, 1 the gains."""
    if optimizer._flat_state is None:
        zeros = np.zeros(model.layout.size, dtype=F32)
        m_flat, v_flat = zeros, zeros
    else:
        m_flat, v_flat, _ = optimizer._flat_state
    out: dict[str, np.ndarray] = {}
    for group in (0, 1):
        out[f"states.{group}.step"] = np.array(optimizer.step, dtype=np.uint64)
        out[f"states.{group}.learning_rate"] = np.array(optimizer.learning_rate, np.float32)
    for moment, flat in (("m", m_flat), ("v", v_flat)):
        for name, value in model.layout.unpack(flat).items():
            out[f"states.{0 if value.ndim >= 2 else 1}.{name}.{moment}"] = value
    return out


def load_optimizer_state_dict(model: GPT, optimizer: AdamW, state: dict[str, np.ndarray]) -> None:
    """Restore `optimizer_state_dict()` output (from this or any other engine)."""
    moments: dict[str, dict[str, np.ndarray]] = {"m": {}, "v": {}}
    for key, value in state.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "states" or parts[1] not in ("0", "1"):
            raise ValueError(f"unexpected optimizer state entry {key!r}")
        if parts[2] in ("step", "learning_rate"):
            continue
        name, _, moment = parts[2].rpartition(".")
        if moment not in moments or not name:
            raise ValueError(f"unexpected optimizer state entry {key!r}")
        moments[moment][name] = np.asarray(value)
    flat_m = model.layout.pack(moments["m"])
    flat_v = model.layout.pack(moments["v"])
    optimizer._flat_state = (flat_m, flat_v, np.empty_like(flat_m))
    optimizer.step = int(np.asarray(state["states.0.step"]))
    optimizer.learning_rate = float(np.asarray(state.get("states.0.learning_rate",
                                                         optimizer.opt.lr)))
