"""`tinylm plan` and `tinylm sweep`: which model is strongest for N minutes on *this* machine.

The planner measures the training-step throughput of a grid of candidate shapes here (compile
excluded), turns it into the tokens each would see in the budget, checks the memory estimate
from config.py against the memory available, and predicts the validation bpb each would reach
from a fitted loss law

    bpb(N, D) = E + A / N**alpha + B / D**beta      (N parameters, D training tokens)

whose constants live in `loss_law.json` beside this file, with where they came from. A sweep
trains several sizes for real at one budget; `--fit` refits the constants from its results.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, OptimConfig, TrainConfig, format_count
from .errors import TinyLMError

LAW_FILE = Path(__file__).with_name("loss_law.json")
CHINCHILLA_TOKENS_PER_PARAM = 20
# Share of the wall-clock budget that becomes training steps (compile, eval pauses excluded
# from the budget, but the first compile and the odd slow step are not).
BUDGET_EFFICIENCY = 0.95


# ----- the loss law ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    source: dict[str, Any]

    def predict(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / max(tokens, 1.0)**self.beta

    @classmethod
    def load(cls, path: Path = LAW_FILE) -> LossLaw:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data[k] for k in ("E", "A", "alpha", "B", "beta")},
                       source=data.get("source", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise TinyLMError(f"cannot read the loss-law constants in {path} ({err}); "
                              "reinstall mlx-tinylm or refit with `tinylm sweep --fit`") from None

    def save(self, path: Path = LAW_FILE) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def fit_loss_law(points: list[tuple[float, float, float]], source: dict[str, Any]) -> LossLaw:
    """Least-squares fit of (params, tokens, bpb) points.

    For each (alpha, beta) on a grid the law is linear in (E, A, B), so those come from a
    non-negative least-squares solve; the pair with the smallest residual wins. Few points and
    no SciPy needed.
    """
    if len(points) < 4:
        raise TinyLMError(f"fitting the loss law needs at least 4 runs, got {len(points)}")
    n = np.array([p[0] for p in points], float)
    d = np.array([p[1] for p in points], float)
    y = np.array([p[2] for p in points], float)
    best: tuple[float, tuple[float, ...]] | None = None
    for alpha in np.linspace(0.05, 1.0, 39):
        for beta in np.linspace(0.05, 1.0, 39):
            X = np.stack([np.ones_like(n), n**-alpha, d**-beta], axis=1)
            coef = _nnls(X, y)
            err = float(np.sum((X @ coef - y) ** 2))
            if best is None or err < best[0]:
                best = (err, (coef[0], coef[1], alpha, coef[2], beta))
    assert best is not None
    E, A, alpha, B, beta = (float(v) for v in best[1])
    return LossLaw(E, A, alpha, B, beta, {**source, "rms_error": math.sqrt(best[0] / len(y)),
                                          "points": [list(p) for p in points]})


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients by dropping negative ones (3 unknowns)."""
    active = list(range(X.shape[1]))
    while True:
        coef = np.zeros(X.shape[1])
        sol, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
        coef[active] = sol
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda i: coef[i]))


# ----- candidates and throughput --------------------------------------------------------------

def candidate_grid(vocab_size: int, widths: tuple[int, ...] = (64, 96, 128, 192, 256, 384),
                   depths: tuple[int, ...] = (2, 4, 6), contexts: tuple[int, ...] = (256,),
                   batches: tuple[int, ...] = (TrainConfig.batch_size,),
                   base: ModelConfig | None = None) -> list[tuple[ModelConfig, int]]:
    """(config, batch) pairs to measure: width × depth × context × batch, 32-wide heads."""
    base = base or ModelConfig()
    grid = []
    for ctx in contexts:
        for w in widths:
            for layers in depths:
                heads = max(1, w // 32)
                cfg = base.with_(vocab_size=vocab_size, d_model=w, n_layers=layers, n_heads=heads,
                                 context_length=ctx)
                grid.extend((cfg, b) for b in batches)
    return grid


def check_measuring(seconds: float, batch_size: int) -> None:
    """One-line errors for settings that would hang or break a measurement."""
    if not (math.isfinite(seconds) and 0 < seconds <= 600):
        raise TinyLMError(f"--seconds must be in (0, 600], got {seconds}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TinyLMError(f"--batch-size must be a positive integer, got {batch_size}")


def check_budget(minutes: float) -> None:
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise TinyLMError(f"--minutes must be > 0, got {minutes}")


def measure_throughput(cfg: ModelConfig, batch_size: int, engine: str,
                       seconds: float = 1.0, min_steps: int = 2) -> float:
    """Steady-state training tok/s of one shape on `engine` (compile and warm-up excluded)."""
    from .engine import make_engine

    check_measuring(seconds, batch_size)
    eng = make_engine(engine, cfg, OptimConfig())
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (batch_size, cfg.context_length), dtype=np.int32)
    y = rng.integers(0, cfg.vocab_size, (batch_size, cfg.context_length), dtype=np.int32)
    for _ in range(2):  # compile + one warm step
        eng.step(x, y, 1e-4)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        eng.step(x, y, 1e-4)
        steps += 1
    return steps * batch_size * cfg.context_length / (time.perf_counter() - start)


# ----- the plan -------------------------------------------------------------------------------

@dataclass
class Candidate:
    config: ModelConfig
    batch_size: int
    tok_s: float
    tokens: float
    memory_bytes: int
    fits: bool
    predicted_bpb: float

    @property
    def params(self) -> int:
        return self.config.n_params

    def row(self) -> dict[str, Any]:
        c = self.config
        return {"d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads,
                "context": c.context_length, "batch_size": self.batch_size, "params": c.n_params,
                "tok_s": round(self.tok_s, 1), "tokens": int(self.tokens),
                "tokens_per_param": round(self.tokens / c.n_params, 2),
                "memory_bytes": self.memory_bytes, "fits": self.fits,
                "predicted_bpb": round(self.predicted_bpb, 4)}


def train_command(c: Candidate, minutes: float) -> str:
    cfg = c.config
    return (f"tinylm train --minutes {minutes:g} --d-model {cfg.d_model} --layers {cfg.n_layers} "
            f"--heads {cfg.n_heads} --context {cfg.context_length} --batch-size {c.batch_size}")


def measure_grid(engine: str = "auto", vocab_size: int = 4096,
                 grid: list[tuple[ModelConfig, int]] | None = None,
                 seconds_per_shape: float = 1.0, progress: Any = None) -> dict[str, Any]:
    """Training tok/s of every candidate that fits in memory, measured here (budget-free)."""
    from .device import available_memory_bytes, device_name
    from .train import resolve_engine

    check_measuring(seconds_per_shape, 1)
    grid = grid or candidate_grid(vocab_size)
    engine = resolve_engine(engine, grid[len(grid) // 2][0], grid[len(grid) // 2][1])
    available = available_memory_bytes()
    shapes = []
    for i, (cfg, batch) in enumerate(grid):
        if progress is not None:
            progress(i, len(grid), cfg)
        mem = cfg.training_memory_bytes(batch, engine=engine)
        fits = not available or mem <= available
        tok_s = measure_throughput(cfg, batch, engine, seconds_per_shape) if fits else 0.0
        shapes.append({"config": cfg.to_dict(), "batch_size": batch, "tok_s": tok_s,
                       "memory_bytes": mem, "fits": fits})
    return {"engine": engine, "device": device_name(), "memory_available": available,
            "vocab_size": vocab_size, "date": date.today().isoformat(), "shapes": shapes}


def make_plan(minutes: float, engine: str = "auto", vocab_size: int = 4096,
              grid: list[tuple[ModelConfig, int]] | None = None, seconds_per_shape: float = 1.0,
              law: LossLaw | None = None, progress: Any = None,
              measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pick the candidate with the lowest predicted bpb that fits, from throughput measured here
    (now, or earlier in `measured`: throughput does not depend on the budget)."""
    check_budget(minutes)
    law = law or LossLaw.load()
    if measured is None:
        measured = measure_grid(engine, vocab_size, grid, seconds_per_shape, progress)
    budget_s = minutes * 60 * BUDGET_EFFICIENCY
    candidates = []
    for shape in measured["shapes"]:
        cfg = ModelConfig.from_dict(shape["config"])
        tokens = shape["tok_s"] * budget_s
        predicted = law.predict(cfg.n_params, tokens) if shape["fits"] else math.inf
        candidates.append(Candidate(cfg, shape["batch_size"], shape["tok_s"], tokens,
                                    shape["memory_bytes"], shape["fits"], predicted))
    usable = [c for c in candidates if c.fits]
    if not usable:
        raise TinyLMError("no candidate model fits in the available memory")
    pick = min(usable, key=lambda c: c.predicted_bpb)
    return {"minutes": minutes, "engine": measured["engine"], "device": measured["device"],
            "memory_available": measured["memory_available"],
            "law": {**asdict(law), "source": law.source},
            "candidates": [c.row() for c in candidates], "pick": pick.row(),
            "pick_config": pick.config.to_dict(), "command": train_command(pick, minutes),
            "measured": measured["date"], "date": date.today().isoformat()}


def measurements_cache_path(engine: str, vocab_size: int) -> Path:
    from .data import cache_dir
    from .device import device_name

    slug = f"{device_name().replace(' ', '-').lower()}-{engine}-v{vocab_size}"
    return cache_dir() / "plans" / f"throughput-{slug}.json"


def save_measurements(measured: dict[str, Any], engine: str) -> None:
    path = measurements_cache_path(engine, measured["vocab_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(measured, indent=2))
    tmp.replace(path)


def measures_current_grid(measured: Any, vocab_size: int) -> bool:
    """Whether cached measurements cover exactly today's candidate shapes and batch."""
    wanted = [(cfg.to_dict(), batch) for cfg, batch in candidate_grid(vocab_size)]
    try:
        return [(s["config"], s["batch_size"]) for s in measured["shapes"]] == wanted
    except (KeyError, TypeError):
        return False


def cached_plan(minutes: float, engine: str = "auto", vocab_size: int = 4096,
                progress: Any = None) -> dict[str, Any]:
    """The plan for this budget from this device's cached throughput (measured on first use)."""
    path = measurements_cache_path(engine, vocab_size)
    measured = None
    if path.is_file():
        try:
            measured = json.loads(path.read_text())
        except (OSError, ValueError):
            measured = None
        if not measures_current_grid(measured, vocab_size):
            measured = None  # measured for another grid: a changed default recipe or batch
    if measured is None:
        measured = measure_grid(engine, vocab_size, progress=progress)
        save_measurements(measured, engine)
    return make_plan(minutes, engine, vocab_size, measured=measured)


# ----- three-axis check for a named size ---------------------------------------------------

def parse_count(text: str) -> float:
    """'10M' -> 1e7, '200k' -> 2e5, '3B' -> 3e9, '5e6' -> 5e6."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    s = text.strip().lower()
    try:
        if s and s[-1] in units:
            value = float(s[:-1]) * units[s[-1]]
        else:
            value = float(s)
    except ValueError:
        raise TinyLMError(f"cannot read {text!r} as a count; write e.g. 10M, 200k or 5e6") from None
    if not (value > 0 and math.isfinite(value)):
        raise TinyLMError(f"a count must be > 0, got {text!r}")
    return value


def shape_for_params(params: float, vocab_size: int = 4096, context: int = 256) -> ModelConfig:
    """A sensible shape (depth grows with width, 32-wide heads) with about `params` parameters."""
    best: ModelConfig | None = None
    for width in range(64, 8193, 32):
        layers = max(2, min(48, round(width / 48)))
        cfg = ModelConfig(vocab_size=vocab_size, d_model=width, n_layers=layers,
                          n_heads=max(1, width // 32), context_length=context)
        if best is None or abs(cfg.n_params - params) < abs(best.n_params - params):
            best = cfg
        if cfg.n_params > params * 2:
            break
    assert best is not None
    return best


def check_size(params: float, tokens: float, batch_size: int = TrainConfig.batch_size,
               engine: str = "auto", vocab_size: int = ModelConfig.vocab_size,
               seconds: float = 1.0) -> dict[str, Any]:
    """Memory, compute and time on this device for a model of `params` trained on `tokens`."""
    from .device import available_memory_bytes, device_name
    from .train import resolve_engine

    check_measuring(seconds, batch_size)
    cfg = shape_for_params(params, vocab_size)
    available = available_memory_bytes()
    mem = cfg.training_memory_bytes(batch_size, engine=engine)
    fits = mem <= available
    flops = cfg.flops_per_token() * tokens
    result: dict[str, Any] = {
        "params_requested": params, "shape": cfg.to_dict(), "params": cfg.n_params,
        "tokens": tokens, "batch_size": batch_size, "device": device_name(),
        "memory": {"estimate_bytes": mem, "available_bytes": available, "fits": fits,
                   "margin_bytes": available - mem},
        "compute": {"flops": flops, "flops_per_token": cfg.flops_per_token()},
        "tokens_per_param": tokens / cfg.n_params,
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * cfg.n_params,
    }
    if fits:
        engine = resolve_engine(engine, cfg, batch_size)
        tok_s = measure_throughput(cfg, batch_size, engine, seconds)
        result["time"] = {"engine": engine, "tok_s": tok_s, "seconds": tokens / tok_s}
    else:
        result["time"] = None
    return result


def describe_check(r: dict[str, Any]) -> list[str]:
    """Plain-language lines for a size check."""
    gib = 2**30
    m = r["memory"]
    lines = [f"model: {format_count(r['params'])} parameters "
             f"(d_model {r['shape']['d_model']}, {r['shape']['n_layers']} layers), "
             f"{format_count(r['tokens'])} tokens, batch {r['batch_size']}"]
    if m["fits"]:
        lines.append(f"memory: fits — needs ~{m['estimate_bytes'] / gib:.2f} GiB of "
                     f"{m['available_bytes'] / gib:.1f} GiB available "
                     f"(margin {m['margin_bytes'] / gib:.1f} GiB)")
    else:
        lines.append(f"memory: does not fit — needs ~{m['estimate_bytes'] / gib:.1f} GiB, "
                     f"only {m['available_bytes'] / gib:.1f} GiB available")
    lines.append(f"compute: {r['compute']['flops']:.3g} FLOPs "
                 f"({format_count(r['compute']['flops_per_token'])} per token)")
    if r["time"]:
        t = r["time"]
        hours = t["seconds"] / 3600
        lines.append(f"time: {t['tok_s']:,.0f} tok/s measured here on {t['engine']} → "
                     f"{hours:.2f} h ({t['seconds'] / 60:,.1f} min)")
    else:
        lines.append("time: not measured (the model does not fit)")
    ratio = r["tokens_per_param"]
    lines.append(f"tokens/parameter: {ratio:.1f} (Chinchilla-optimal ≈ "
                 f"{CHINCHILLA_TOKENS_PER_PARAM}; {format_count(r['chinchilla_tokens'])} tokens "
                 "for this size)")
    return lines


# ----- sweep ----------------------------------------------------------------------------------

def run_sweep(minutes: float | None, presets: list[str], data: Any, out: Path, seed: int = 0,
              fit: bool = False, progress: Any = None, tokens: int | None = None,
              engine: str = "auto", fit_with: list[Path] | None = None,
              law_file: Path = LAW_FILE) -> dict[str, Any]:
    """Train each preset for `minutes` (or `tokens`) here, one after another; write a table
    and a plot into `out`. With `fit`, refit the loss law on these runs plus those of the
    earlier sweep folders in `fit_with`: one budget alone moves parameters and tokens together,
    so a second budget is what lets the fit tell their effects apart."""
    from .config import TrainConfig
    from .config import preset as get_preset
    from .dashboard import PlainLog
    from .engine import current_rss_bytes, process_peak_rss_bytes, reset_peak_rss
    from .train import build_spec, train

    for name in presets:
        get_preset(name)  # unknown names fail before any folder or training
    earlier = [row for folder in fit_with or [] for row in read_sweep(folder)["rows"]]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TinyLMError(f"cannot create the sweep folder {out} ({err.strerror or err}); "
                          "choose another --out") from None
    # The process before any training: what each size adds to it is what the estimate predicts
    # (memory freed by a smaller size stays with the process, and a larger one reuses it).
    baseline = current_rss_bytes()
    rows = []
    for name in presets:
        spec = build_spec(data, preset=name, overrides={}, optim=OptimConfig(),
                          train_cfg=TrainConfig(minutes=minutes, tokens=tokens, seed=seed,
                                                sample_tokens=0, engine=engine),
                          out=out / name)
        reporter = progress if progress is not None else PlainLog(every_s=30.0)
        reset_peak_rss()  # each size's own peak, not the largest so far in this process
        summary = train(spec, data, reporter)
        train_mem = process_peak_rss_bytes() - baseline
        rows.append({"preset": name, "params": summary["params"], "tokens": summary["tokens"],
                     "tokens_per_param": summary["tokens_per_param"], "tok_s": summary["tok_s"],
                     "val_bpb": summary["val_bpb"], "val_loss": summary["val_loss"],
                     "peak_mem": summary["peak_mem"], "engine": summary["engine"],
                     # what training added to the process: the estimate's measured counterpart
                     "train_mem": train_mem,
                     "memory_estimate": spec.model.training_memory_bytes(
                         spec.train.batch_size, engine=spec.engine)})
    result = {"minutes": minutes, "tokens": tokens, "date": date.today().isoformat(), "rows": rows,
              "best": min(rows, key=lambda r: r["val_bpb"])}
    if fit:
        from .device import device_name

        law = fit_loss_law([(r["params"], r["tokens"], r["val_bpb"]) for r in rows + earlier],
                           {"device": device_name(), "date": result["date"],
                            "data": str(data.path), "budget_minutes": minutes,
                            "budget_tokens": tokens,
                            "also_fitted": [str(f) for f in fit_with or []]})
        law.save(law_file)
        result["law"] = asdict(law)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    title = f"{minutes:g}-minute sweep" if minutes else f"{format_count(tokens or 0)}-token sweep"
    plot_sweep(rows, out / "sweep.png", title)
    return result


def read_sweep(folder: Path) -> dict[str, Any]:
    """An earlier sweep's sweep.json; a one-line error when it is missing or damaged."""
    path = Path(folder) / "sweep.json"
    try:
        result = json.loads(path.read_text())
        for r in result["rows"]:
            float(r["params"]), float(r["tokens"]), float(r["val_bpb"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TinyLMError(f"{path} is not a sweep result ({type(err).__name__}); give a folder "
                          "that `tinylm sweep` wrote") from None
    return result


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["params"] for r in rows]
    ys = [r["val_bpb"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(f"{r['preset']}\n{r['tokens_per_param']:.2g} tok/param",
                    (r["params"], r["val_bpb"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
