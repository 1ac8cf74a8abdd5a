"""The budgeted training loop: the main job of `tinylm train`.

One call, `train(...)`, takes prepared data, a model and a budget (minutes, steps or tokens), and
produces a run folder. The learning rate follows the elapsed fraction of the budget (schedule.py),
so a run ends annealed whatever the device speed. Batches are prepared on a background thread.
The budget clock covers the training steps (compile included); evaluation, samples and
checkpoints pause it. Everything the user sees goes through a `Reporter` (dashboard.py).
"""

from __future__ import annotations

import math
import os
import platform
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__, checkpoint
from .config import ModelConfig, OptimConfig, TrainConfig
from .data import BatchSampler, PreparedData
from .engine import Engine, make_engine
from .errors import TinyLMError
from .schedule import Schedule

DEFAULT_PROMPT = "Once upon a time"
AUTO_PRESET = "auto"
SHAPE_FIELDS = {"d_model", "n_layers", "n_heads", "context_length"}  # what a plan decides


class TrainingDiverged(TinyLMError):
    """Loss or gradient norm became non-finite."""


class Interrupted(TinyLMError):
    exit_code = 130


class Reporter(Protocol):
    """What the loop tells the outside world; dashboard.py has the implementations."""

    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, m: dict[str, Any]) -> None: ...
    def evaluation(self, m: dict[str, Any]) -> None: ...
    def sample_piece(self, text: str, first: bool) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # budget seconds used so far
    sampler: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # per step, for resume-equivalence checks


def default_run_name(preset: str) -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{preset}"


# ----- evaluation -------------------------------------------------------------------------------

def evaluate_split(engine: Engine, tokens: np.ndarray, n_bytes: int, context: int,
                   batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Loss, ppl and bpb of the engine's weights over a split (or its first `max_batches`)."""
    from .generate import window_metrics

    return window_metrics(engine.eval_loss, tokens, n_bytes, context, batch_size, max_batches)


def sample_text(engine: Engine, data: PreparedData, prompt: str, max_tokens: int, seed: int,
                on_piece: Any = None) -> str:
    """A short continuation of `prompt` from the engine's current weights, streamed to on_piece."""
    import mlx.core as mx

    from .generate import generate
    from .model import GPT

    model = getattr(engine, "model", None)
    if engine.name != "mlx":  # sample through MLX from the NumPy engine's weights
        model = GPT(engine.cfg)
        model.load_named_weights({k: mx.array(v) for k, v in engine.weights().items()})
    pieces = []
    for piece in generate(model, data.tokenizer, prompt, max_tokens=max_tokens, seed=seed):
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece, len(pieces) == 1)
    return "".join(pieces)


# ----- background batches ------------------------------------------------------------------------

class Prefetcher:
    """Draws batches on a background thread so the step never waits on NumPy indexing.

    Each item carries the sampler state *after* drawing it, which is what a checkpoint taken
    after consuming that batch must store for an exact resume.
    """

    def __init__(self, sampler: BatchSampler, depth: int = 4):
        self.sampler = sampler
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            x, y = self.sampler.next()
            item = (x, y, self.sampler.state_dict())
            while not self.stopped.is_set():
                try:
                    self.items.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def get(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any], float]:
        start = time.perf_counter()
        x, y, state = self.items.get()
        return x, y, state, time.perf_counter() - start

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 130."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum  # a second Ctrl-C lands here too and changes nothing

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----- the loop -----------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """A fully resolved run: what `train()` needs beyond the data."""

    run_dir: Path
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    engine: str  # resolved: 'mlx' or 'numpy'
    preset: str
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in config.json (plan, data)


def _fraction(kind: str, t: TrainConfig, state: LoopState, tokens_per_step: int,
              step_time: float) -> tuple[float, bool]:
    """(schedule fraction at the end of the coming step, whether it is the last step)."""
    if kind == "steps":
        assert t.steps is not None
        return (state.step + 1) / t.steps, state.step + 1 >= t.steps
    if kind == "tokens":
        assert t.tokens is not None
        after = state.tokens + tokens_per_step
        return min(after / t.tokens, 1.0), after >= t.tokens
    budget = (t.minutes or 0) * 60
    # The last step is the one after which another would overrun; it runs at the final rate.
    if budget - state.elapsed < 2 * step_time:
        return 1.0, True
    return (state.elapsed + step_time) / budget, False


def _progress(kind: str, t: TrainConfig, state: LoopState) -> float:
    if kind == "steps":
        return state.step / (t.steps or 1)
    if kind == "tokens":
        return min(state.tokens / (t.tokens or 1), 1.0)
    return min(state.elapsed / ((t.minutes or 1) * 60), 1.0)


def run_config(spec: RunSpec, data: PreparedData) -> dict[str, Any]:
    import mlx.core as mx

    from .device import device_name

    return {
        "model": spec.model.to_dict(),
        "optim": asdict(spec.optim),
        "train": asdict(spec.train),
        "engine": spec.engine,
        "preset": spec.preset,
        "data": {"path": str(data.path), "meta": {k: v for k, v in data.meta.items()
                                                  if k in ("source", "content_hash", "splits")}},
        "tokenizer": {"vocab_size": data.tokenizer.vocab_size, "eos_id": data.tokenizer.eos_id},
        "device": device_name(),
        "versions": {"mlx_tinylm": __version__, "mlx": mx.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        **spec.extra,
    }


def train(spec: RunSpec, data: PreparedData, reporter: Reporter) -> dict[str, Any]:
    """Train per `spec` on `data`, reporting to `reporter`; returns the final summary."""
    run_dir = spec.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TinyLMError(f"cannot create the run folder {run_dir} ({err.strerror or err}); "
                          "choose another --out") from None
    with checkpoint.run_lock(run_dir, warn=reporter.message):
        return _train_locked(spec, data, reporter)


def _train_locked(spec: RunSpec, data: PreparedData, reporter: Reporter) -> dict[str, Any]:
    from .device import matmul_gflops, numpy_matmul_gflops

    # From here on Ctrl-C and SIGTERM set a flag instead of raising wherever the main thread
    # happens to be: the loop saves and stops at a step boundary, and an interrupt during
    # setup is answered before the first step.
    with StopFlag() as stop:
        run_dir, cfg, t = spec.run_dir, spec.model, spec.train
        train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
        if len(train_tokens) <= cfg.context_length + 1:
            raise TinyLMError(f"the training split has {len(train_tokens)} tokens, fewer than one "
                              f"window of {cfg.context_length + 1}; use more text or a shorter "
                              "--context")

        state = LoopState()
        weights = optimizer = None
        if spec.resume:
            weights, optimizer, saved = checkpoint.load_checkpoint(run_dir)
            state = _loop_state(saved, run_dir)
            checkpoint.check_weights(weights, cfg.param_shapes(),
                                     checkpoint.checkpoint_dir(run_dir))
        engine = make_engine(spec.engine, cfg, spec.optim, t.seed, weights, optimizer)
        sampler = BatchSampler(train_tokens, t.batch_size, cfg.context_length, t.seed)
        if state.sampler:
            sampler.load_state_dict(state.sampler)
        if not spec.resume:
            (run_dir / checkpoint.METRICS).unlink(missing_ok=True)
        config = run_config(spec, data)
        checkpoint.write_config(run_dir, config)
        _copy_tokenizer(data, run_dir)

        # The matmul peak for MFU, measured once here, outside the budget.
        peak_gflops = (matmul_gflops(seconds=0.3) if spec.engine == "mlx"
                       else numpy_matmul_gflops(0.3))
        flops_per_token = cfg.flops_per_token()
        tokens_per_step = t.batch_size * cfg.context_length
        kind = t.budget_kind
        schedule = Schedule(spec.optim.lr, t.warmup, t.decay, t.final_lr_frac, t.schedule)

        reporter.start({
            "run": run_dir.name, "run_dir": str(run_dir), "engine": spec.engine,
            "device": config["device"], "params": cfg.n_params, "model": cfg.to_dict(),
            "budget": {"time": f"{t.minutes} min", "steps": f"{t.steps} steps",
                       "tokens": f"{t.tokens} tokens"}[kind],
            "resumed_at_step": state.step if spec.resume else None,
            "train_tokens": len(train_tokens), "peak_gflops": peak_gflops, "prompt": DEFAULT_PROMPT,
        })

        def log(record: dict[str, Any]) -> None:
            checkpoint.append_metrics(run_dir, {"time": time.time(), **record})

        def save() -> None:
            state.sampler = last_sampler_state
            checkpoint.save_checkpoint(run_dir, engine.weights(), engine.optimizer_state(),
                                       {"loop": asdict(state)})

        def periodic_eval() -> dict[str, Any]:
            m = evaluate_split(engine, val_tokens, data.n_bytes("val"), cfg.context_length,
                               t.batch_size, max_batches=t.eval_batches)
            record = {"event": "eval", "step": state.step, "tokens": state.tokens,
                      "elapsed": state.elapsed, "val_loss": m["loss"], "val_ppl": m["ppl"],
                      "val_bpb": m["bpb"]}
            log(record)
            reporter.evaluation(record)
            if t.sample_tokens > 0:
                sample_text(engine, data, DEFAULT_PROMPT, t.sample_tokens, t.seed,
                            reporter.sample_piece)
            return record

        if stop.signal is not None:
            raise Interrupted("training interrupted before its first step (nothing new to save)")
        prefetch = Prefetcher(sampler)
        last_sampler_state = sampler.state_dict() if not state.sampler else state.sampler
        step_time, wait_total, lr = 0.0, 0.0, schedule(0.0)
        window_tokens, window_time = 0, 0.0
        next_eval = (math.floor(_progress(kind, t, state) / t.eval_every) + 1) * t.eval_every
        last_save = time.monotonic()
        last_report = 0.0
        try:
            if spec.resume:
                reporter.message(f"resumed at step {state.step} "
                                 f"({state.elapsed:.0f}s of budget used)")
            while True:
                if kind == "time" and state.elapsed >= (t.minutes or 0) * 60:
                    break
                frac, last = _fraction(kind, t, state, tokens_per_step, step_time)
                lr = schedule(frac)
                t0 = time.perf_counter()
                x, y, sampler_after, waited = prefetch.get()
                loss, gnorm = engine.step(x, y, lr)
                dt = time.perf_counter() - t0
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    raise TrainingDiverged(
                        f"loss became {loss} (gradient norm {gnorm}) at step {state.step + 1} "
                        f"with learning rate {lr:.3g}; lower --lr and start again "
                        "(the last checkpoint is intact)")
                last_sampler_state = sampler_after
                wait_total += waited
                state.step += 1
                state.tokens += tokens_per_step
                state.elapsed += dt
                state.losses.append(loss)
                # Compile makes the first step slow: estimate the step time from the rest.
                step_time = dt if state.step <= 2 else 0.8 * step_time + 0.2 * dt
                if state.step > 1:
                    window_tokens += tokens_per_step
                    window_time += dt
                now = time.monotonic()
                if now - last_report >= t.log_every_s or last:
                    tok_s = window_tokens / window_time if window_time else tokens_per_step / dt
                    record = {"event": "step", "step": state.step, "tokens": state.tokens,
                              "elapsed": state.elapsed, "loss": loss, "lr": lr,
                              "grad_norm": gnorm, "tok_s": tok_s,
                              "mfu": tok_s * flops_per_token / (peak_gflops * 1e9),
                              "wait_s": wait_total, "peak_mem": engine.peak_memory_bytes(),
                              "progress": _progress(kind, t, state)}
                    log(record)
                    reporter.step(record)
                    last_report = now
                if _progress(kind, t, state) >= next_eval and not last:
                    periodic_eval()
                    next_eval += t.eval_every
                if stop.signal is not None:
                    reporter.message("interrupted: saving a checkpoint (resume with --resume)")
                    save()
                    raise Interrupted(f"training interrupted at step {state.step}; checkpoint "
                                      f"saved in {run_dir} (resume with --resume --out {run_dir})")
                if now - last_save >= t.checkpoint_every_minutes * 60:
                    save()
                    last_save = time.monotonic()
                if last:
                    break
            save()
            if stop.signal is not None:  # Ctrl-C during the last step or the final save
                raise Interrupted(f"training interrupted after its last step ({state.step}); "
                                  f"checkpoint saved in {run_dir}")
        finally:
            prefetch.close()

    # ----- after the budget: exact evaluation, sample, artefacts -------------------------------
    t_eval = time.perf_counter()
    final = evaluate_split(engine, val_tokens, data.n_bytes("val"), cfg.context_length,
                           t.batch_size)
    eval_seconds = time.perf_counter() - t_eval
    tok_s = window_tokens / window_time if window_time else state.tokens / max(state.elapsed, 1e-9)
    sample = sample_text(engine, data, DEFAULT_PROMPT, 120, t.seed) if t.sample_tokens else ""
    summary = {
        "run_dir": str(run_dir), "engine": spec.engine, "params": cfg.n_params,
        "steps": state.step, "tokens": state.tokens,
        "tokens_per_param": state.tokens / cfg.n_params,
        "train_seconds": state.elapsed, "tok_s": tok_s,
        "mfu": tok_s * flops_per_token / (peak_gflops * 1e9), "final_lr": lr,
        "train_loss": state.losses[-1] if state.losses else None,
        "val_loss": final["loss"], "val_ppl": final["ppl"], "val_bpb": final["bpb"],
        "val_tokens": final["tokens"], "eval_seconds": eval_seconds,
        "step_wait_seconds": wait_total, "peak_mem": engine.peak_memory_bytes(),
        "sample": sample, "sample_command": f'tinylm sample {run_dir} --prompt "{DEFAULT_PROMPT}"',
    }
    log({"event": "final", **{k: v for k, v in summary.items() if k != "sample"}})
    _write_artefacts(run_dir, spec, summary)
    reporter.finish(summary)
    return summary


def _loop_state(saved: Any, run_dir: Path) -> LoopState:
    """The loop state of a checkpoint's state.json, checked field by field."""
    try:
        state = LoopState(**saved["loop"])
        ok = (isinstance(state.step, int) and state.step >= 0 and isinstance(state.tokens, int)
              and isinstance(state.elapsed, (int, float)) and math.isfinite(state.elapsed)
              and isinstance(state.sampler, dict) and isinstance(state.losses, list)
              and (not state.sampler or all(isinstance(state.sampler.get(k), int)
                                            for k in ("seed", "step"))))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise checkpoint.CheckpointError(
            f"{run_dir / checkpoint.CHECKPOINT / checkpoint.STATE} does not hold a valid training "
            "state; the checkpoint is damaged and cannot be resumed")
    return state


def _copy_tokenizer(data: PreparedData, run_dir: Path) -> None:
    target = run_dir / checkpoint.TOKENIZER
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(Path(data.tokenizer.model_path).read_bytes())
    os.replace(tmp, target)


def _write_artefacts(run_dir: Path, spec: RunSpec, summary: dict[str, Any]) -> None:
    """loss.png and the README.md model card."""
    from .plots import plot_losses

    plot_losses(checkpoint.read_metrics(run_dir), run_dir / "loss.png")
    cfg = spec.model
    card = f"""# {run_dir.name}

A {cfg.n_params / 1e6:.2f}M-parameter Llama-style GPT trained with mlx-tinylm
({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, context {cfg.context_length},
{cfg.mlp} MLP, vocabulary {cfg.vocab_size}) on the {spec.engine} engine.

| metric | value |
|---|---|
| tokens trained | {summary['tokens']:,} ({summary['tokens_per_param']:.1f} per parameter) |
| training time | {summary['train_seconds']:.1f} s |
| throughput | {summary['tok_s']:,.0f} tok/s (MFU {summary['mfu']:.1%}) |
| validation loss | {summary['val_loss']:.4f} |
| validation perplexity | {summary['val_ppl']:.2f} |
| validation bits per byte | {summary['val_bpb']:.4f} |

Sample (prompt "{DEFAULT_PROMPT}"):

> {summary['sample'].strip().replace(chr(10), chr(10) + '> ')}

Sample again with `{summary['sample_command']}`.
"""
    (run_dir / "README.md").write_text(card)


# ----- from user options to a run ----------------------------------------------------------------

def resolve_engine(name: str, cfg: ModelConfig, batch_size: int) -> str:
    """'auto' -> MLX on a GPU; on a CPU, whichever engine measures faster for this model."""
    from .config import ENGINES

    if name not in ENGINES:
        raise TinyLMError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name != "auto":
        return name
    from .device import device_name

    if device_name() != "CPU":
        return "mlx"
    try:
        from .bench import fastest_engine
    except ImportError:
        return "mlx"
    return fastest_engine(cfg, batch_size, cfg.context_length)


def load_data(data: str | None = None, files: list[str] | None = None,
              val_files: list[str] | None = None, dataset: str | None = None,
              vocab_size: int | None = None, progress: bool = True) -> PreparedData:
    """Prepared data from a folder, local files or a hub dataset (prepared once, then cached)."""
    from .data import DEFAULT_DATASET, load_prepared, prepare

    if data is not None:
        if files or dataset:
            raise TinyLMError("use only one of --data, --files and --dataset")
        return load_prepared(data)
    kwargs: dict[str, Any] = {"progress": progress}
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if files:
        if dataset:
            raise TinyLMError("use only one of --files and --dataset")
        return prepare(files=files, val_files=val_files or None, **kwargs)
    return prepare(dataset=dataset or DEFAULT_DATASET, **kwargs)


def resume_spec(out: str | Path | None) -> tuple[RunSpec, PreparedData]:
    """The spec and data of an interrupted run, read back from its run folder."""
    from .data import load_prepared

    if out is None:
        raise TinyLMError("--resume needs --out RUN_DIR (the run folder to continue)")
    run_dir = Path(out)
    if not run_dir.is_dir():
        raise TinyLMError(f"run folder {run_dir} does not exist; check --out")
    if checkpoint.checkpoint_dir(run_dir) is None:
        raise TinyLMError(f"{run_dir} has no checkpoint to resume from (the run stopped "
                          "before its first save); start it again without --resume")
    saved = checkpoint.read_config(run_dir)
    try:
        spec = RunSpec(run_dir=run_dir, model=ModelConfig.from_dict(saved["model"]),
                       optim=OptimConfig.from_dict(saved["optim"]),
                       train=TrainConfig(**saved["train"]), engine=saved["engine"],
                       preset=saved.get("preset", "custom"), resume=True)
        data_path = saved["data"]["path"]
    except (KeyError, TypeError, ValueError) as err:
        detail = " ".join(str(err).split())  # a damaged key may itself hold a line break
        raise TinyLMError(f"{run_dir / checkpoint.CONFIG} is incomplete or damaged "
                          f"({type(err).__name__}: {detail}); it cannot be resumed") from None
    if not isinstance(data_path, str) or not Path(data_path).is_dir():
        raise TinyLMError(f"the data {run_dir} was trained on is not at {data_path!r} any more; "
                          "put it back (tinylm data prepare) to resume")
    data = load_prepared(data_path)
    run_tokenizer = run_dir / checkpoint.TOKENIZER
    if run_tokenizer.is_file() and (run_tokenizer.read_bytes()
                                    != Path(data.tokenizer.model_path).read_bytes()):
        raise TinyLMError(f"{data_path} now holds data tokenised differently from {run_dir}'s "
                          "tokenizer; it cannot be resumed on it (start a new run instead)")
    if data.tokenizer.vocab_size != spec.model.vocab_size:
        raise TinyLMError(f"{data_path} has a {data.tokenizer.vocab_size}-token vocabulary but "
                          f"the run's model has {spec.model.vocab_size}; it cannot be resumed "
                          "on it")
    return spec, data


def build_spec(data: PreparedData, *, preset: str, overrides: dict[str, Any], optim: OptimConfig,
               train_cfg: TrainConfig, out: str | Path | None, force: bool = False,
               reporter_message: Any = None) -> RunSpec:
    """Resolve model shape, engine and run folder for a new run; check it fits in memory."""
    from .config import preset as get_preset
    from .device import available_memory_bytes

    changes = {k: v for k, v in overrides.items() if v is not None}
    extra: dict[str, Any] = {}
    if preset == AUTO_PRESET:
        base, train_cfg, extra = _auto_preset(data, train_cfg, changes, reporter_message)
    else:
        base = get_preset(preset)
    model = base.with_(vocab_size=data.tokenizer.vocab_size, **changes)
    needed = model.training_memory_bytes(train_cfg.batch_size, engine=train_cfg.engine)
    available = available_memory_bytes()
    if available and needed > available and not force:
        raise TinyLMError(f"this model needs about {needed / 2**30:.1f} GiB to train but "
                          f"{available / 2**30:.1f} GiB is available; choose a smaller model or "
                          "batch, or pass --force")
    # Only the MLX engine implements Muon; 'auto' must not pick another.
    engine = ("mlx" if optim.optimizer != "adamw" and train_cfg.engine == "auto"
              else resolve_engine(train_cfg.engine, model, train_cfg.batch_size))
    if engine != "mlx" and optim.optimizer != "adamw":
        raise TinyLMError(f"the {engine} engine implements AdamW only, not {optim.optimizer}; "
                          "use --engine mlx")
    name = preset if model == base.with_(vocab_size=model.vocab_size) else f"{preset}-custom"
    run_dir = Path(out) if out is not None else Path("models") / default_run_name(name)
    if checkpoint.checkpoint_dir(run_dir) is not None:
        raise TinyLMError(f"{run_dir} already holds a run; continue it with --resume or choose "
                          "another --out")
    return RunSpec(run_dir=run_dir, model=model, optim=optim, train=train_cfg, engine=engine,
                   preset=preset, extra=extra)


def _auto_preset(data: PreparedData, train_cfg: TrainConfig, changes: dict[str, Any],
                 message: Any) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """`--preset auto`: the planner's pick for a time budget (measured once per device and
    budget, then cached); the default preset when a shape flag or a step/token budget is given."""
    from dataclasses import replace

    from .config import DEFAULT_PRESET
    from .config import preset as get_preset
    from .plan import cached_plan

    if SHAPE_FIELDS & set(changes) or train_cfg.budget_kind != "time":
        return get_preset(DEFAULT_PRESET), train_cfg, {}
    if message is not None:
        message("planning the model size for this machine and budget (once; then cached)")
    plan = cached_plan(train_cfg.minutes or 5.0, train_cfg.engine, data.tokenizer.vocab_size)
    base = ModelConfig.from_dict(plan["pick_config"])
    train_cfg = replace(train_cfg, batch_size=plan["pick"]["batch_size"])
    return base, train_cfg, {"plan": {"pick": plan["pick"], "command": plan["command"],
                                      "engine": plan["engine"], "date": plan["date"]}}
