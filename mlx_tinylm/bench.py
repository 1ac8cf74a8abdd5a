"""`tinylm bench`: the same model in MLX, PyTorch and NumPy, measured side by side in one run.

Every engine runs in its own worker process (`python -m mlx_tinylm.bench --worker NAME`): PyTorch
must not share a process with the OpenBLAS that mlx_tinylm loads for MLX (its MKL `sgemm` calls
would bind to it and run at half speed), and separate processes keep thread pools and allocators
apart. The parent drives the workers in rounds — each engine trains for a slice of the time
budget, then the next — so a machine that is busy with something else slows every engine alike.

Per engine: train-step tok/s (median over steps after warm-up, with min and max), forward-only
tok/s, greedy generation tok/s with a KV cache, peak memory, the framework's float32 matmul peak
measured in the same run, and MFU (design.md: model FLOPs per second / that peak). Every engine
starts from the same initial weights and batch; their first-step losses must agree to 1e-3.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_PRESET, ModelConfig, OptimConfig, preset
from .engine import reset_peak_rss
from .errors import TinyLMError

AGREEMENT_TOLERANCE = 1e-3
REPO_ROOT = Path(__file__).resolve().parents[1]
TORCH_MODEL_FILE = REPO_ROOT / "benchmarks" / "torch_gpt.py"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


class BenchError(TinyLMError):
    """A benchmark that cannot run as asked (bad engine name, failed agreement check)."""


@dataclass(frozen=True)
class Engine:
    name: str
    framework: str  # mlx | torch | numpy
    label: str
    compiled: bool


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("mlx-compiled", "mlx", "MLX (compiled)", True),
    Engine("mlx-uncompiled", "mlx", "MLX (uncompiled)", False),
    Engine("torch-eager", "torch", "PyTorch eager", False),
    Engine("torch-compiled", "torch", "torch.compile", True),
    Engine("numpy", "numpy", "NumPy (fastnp)", False),
)}
GROUPS = {"mlx": ("mlx-compiled", "mlx-uncompiled"), "torch": ("torch-eager", "torch-compiled"),
          "numpy": ("numpy",)}
BASELINE = "torch-eager"


def parse_engines(text: str) -> list[str]:
    """'mlx,torch,numpy' (groups or engine names) -> engine names in a stable order."""
    chosen: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        names = GROUPS.get(item, (item,) if item in ENGINES else None)
        if names is None:
            raise BenchError(f"unknown engine {item!r}; choose from "
                             f"{', '.join([*GROUPS, *ENGINES])}")
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise BenchError("no engines given; use e.g. --engines mlx,torch,numpy")
    return [n for n in ENGINES if n in chosen]


# ===== worker side =============================================================================

def _rss_mb(field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its high-water mark (VmHWM) of this process, MB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def _timed_loop(fn: Callable[[], Any], seconds: float, min_steps: int,
                max_steps: int = 10**6) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_steps and (len(times) < min_steps
                                      or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class _Runner:
    """One engine inside a worker process; subclasses fill in the framework."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def setup(self, cfg: ModelConfig, weights: dict[str, np.ndarray], tokens: np.ndarray,
              opt: OptimConfig) -> float:
        raise NotImplementedError

    def train_step(self) -> None:
        raise NotImplementedError

    def forward(self) -> None:
        raise NotImplementedError

    def generate(self, prompt: np.ndarray, new_tokens: int) -> list[int]:
        raise NotImplementedError

    def matmul_once(self, n: int) -> Callable[[], None]:
        """A function doing one synchronised float32 n×n matmul."""
        raise NotImplementedError

    def matmul_gflops(self, reps: int = 5, n: int = 1024) -> float:
        """Float32 matmul peak: the fastest of `reps` n×n products (robust to a busy machine)."""
        once = self.matmul_once(n)
        once()
        return 2 * n**3 / min(_timed_loop(once, 0.0, reps)) / 1e9

    def framework_peak_mb(self) -> float | None:
        return None

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    def device(self) -> str:
        return "cpu"


class _MLXRunner(_Runner):
    def setup(self, cfg, weights, tokens, opt):
        import mlx.core as mx

        from . import model as M

        self.mx, self.M = mx, M
        self.model = M.GPT(cfg)
        self.model.load_named_weights({k: mx.array(v) for k, v in weights.items()})
        self.optimizer = M.make_optimizer(opt)
        self.step = M.make_train_step(self.model, self.optimizer, opt.grad_clip,
                                      compile=self.engine.compiled)
        self.inputs, self.targets = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])
        self.state = [self.model.state, self.optimizer.state]

        streams = M.batch_streams()  # the forward shares the batch across streams as the step does

        def fwd(x, y):
            def loss_only(model, a, b):
                return M.loss_fn(model, a, b), {}

            return M.split_loss_and_grad(loss_only, streams, self.model, x, y)[0]

        self.fwd = mx.compile(fwd, inputs=self.model.state) if self.engine.compiled else fwd
        from .device import get_blas_threads

        self._blas_threads = get_blas_threads() or 1  # as the step set it up
        mx.reset_peak_memory()
        loss, norm = self.step(self.inputs, self.targets)
        mx.eval(loss, norm, self.state)
        return loss.item()

    def train_step(self):
        loss, norm = self.step(self.inputs, self.targets)
        self.mx.eval(loss, norm, self.state)

    def forward(self):
        self.mx.eval(self.fwd(self.inputs, self.targets))

    def generate(self, prompt, new_tokens):
        mx = self.mx
        cache = self.M.make_cache(self.model)
        logits = self.model(mx.array(prompt[None]), cache)
        out = []
        for _ in range(new_tokens):
            token = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(token)
            out.append(int(token.item()))
            logits = self.model(token[:, None], cache)
        return out

    def matmul_once(self, n):
        mx = self.mx
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)

    def matmul_gflops(self, reps=5, n=1024):
        # The training step gives each of its two streams half the cores for BLAS; the peak is
        # what one matmul gets with all of them.
        from .device import set_blas_threads

        set_blas_threads(os.cpu_count() or 1)
        try:
            return super().matmul_gflops(reps, n)
        finally:
            set_blas_threads(self._blas_threads)

    def framework_peak_mb(self):
        return self.mx.get_peak_memory() / 2**20

    def versions(self):
        return {"mlx": self.mx.__version__, "numpy": np.__version__}

    def device(self):
        from .device import device_name

        return device_name()


class _TorchRunner(_Runner):
    def setup(self, cfg, weights, tokens, opt):
        torch = self.torch
        self.tg = _load_torch_model()
        self.dev = self.tg.pick_device()
        self.model = self.tg.GPT(cfg).to(self.dev)
        self.model.load_named_weights(weights)
        self.optimizer = self.tg.make_optimizer(self.model, opt)
        self.step = self.tg.make_train_step(self.model, self.optimizer, opt.grad_clip,
                                            compile=self.engine.compiled)
        t = torch.as_tensor(tokens, device=self.dev)
        self.inputs, self.targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        self.fwd = (torch.compile(self.tg.loss_fn) if self.engine.compiled
                    else self.tg.loss_fn)
        if self.dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        loss, _ = self.step(self.inputs, self.targets)
        return loss

    def train_step(self):
        self.step(self.inputs, self.targets)  # .item() inside synchronises

    def forward(self):
        with self.torch.no_grad():
            self.fwd(self.model, self.inputs, self.targets).item()

    def generate(self, prompt, new_tokens):
        torch = self.torch
        caches = [[None, None] for _ in self.model.model.layers]
        out = []
        with torch.no_grad():
            tokens = torch.as_tensor(prompt[None], device=self.dev)
            logits = self.model(tokens, caches, 0)
            offset = tokens.shape[1]
            for _ in range(new_tokens):
                token = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(token.item()))
                logits = self.model(token, caches, offset)
                offset += 1
        return out

    def matmul_once(self, n):
        a = self.torch.randn(n, n, device=self.dev)
        b = self.torch.randn(n, n, device=self.dev)
        sync = {"cuda": getattr(self.torch.cuda, "synchronize", None),
                "mps": getattr(getattr(self.torch, "mps", None), "synchronize", None)}.get(self.dev)

        def once():
            a @ b
            if sync is not None:
                sync()

        return once

    def framework_peak_mb(self):
        if self.dev == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None

    def versions(self):
        return {"torch": self.torch.__version__, "numpy": np.__version__}

    def device(self):
        return f"{self.dev} ({self.torch.get_num_threads()} threads)" if self.dev == "cpu" \
            else self.dev


class _NumpyRunner(_Runner):
    def setup(self, cfg, weights, tokens, opt):
        from . import fastnp

        self.np_model = fastnp.GPT(cfg, weights)
        self.optimizer = fastnp.AdamW(opt)
        self.step = fastnp.make_train_step(self.np_model, self.optimizer, opt.grad_clip)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        loss, _ = self.step(self.inputs, self.targets)
        return loss

    def train_step(self):
        self.step(self.inputs, self.targets)

    def forward(self):
        self.np_model.loss(self.inputs, self.targets)

    def generate(self, prompt, new_tokens):
        logits, cache = self.np_model.decode(prompt[None], None)
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0]))
            out.append(token)
            logits, cache = self.np_model.decode(np.array([[token]]), cache)
        return out

    def matmul_once(self, n):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        return lambda: a @ b

    def device(self):
        from . import fastnp

        return f"cpu ({fastnp.default_workers()} workers)"


def _load_torch_model():
    """benchmarks/torch_gpt.py, loaded by path (it is not part of the installed package)."""
    if not TORCH_MODEL_FILE.exists():
        raise FileNotFoundError(f"{TORCH_MODEL_FILE} not found: run the benchmark from a "
                                "checkout of mlx-tinylm")
    spec = importlib.util.spec_from_file_location("tinylm_torch_gpt", TORCH_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _make_runner(engine: Engine) -> _Runner | str:
    """The runner, or a reason why this engine cannot run in this environment."""
    if engine.framework == "mlx":
        try:
            import mlx.core  # noqa: F401
        except ImportError as err:
            return f"MLX is not installed ({err})"
        return _MLXRunner(engine)
    if engine.framework == "torch":
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install -e '.[bench]')"
        if not TORCH_MODEL_FILE.exists():
            return f"{TORCH_MODEL_FILE.name} not found (run from a checkout)"
        runner = _TorchRunner(engine)
        runner.torch = torch
        return runner
    return _NumpyRunner(engine)


def _worker_main(name: str) -> None:
    """Serve one engine: JSON commands on stdin, one JSON reply per line on the original stdout.

    Libraries that print go to stderr: fd 1 is pointed there so they cannot corrupt replies.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    base_rss = _rss_mb()
    engine = ENGINES[name]
    runner = _make_runner(engine)

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    if isinstance(runner, str):
        reply({"skip": runner})
        return
    reply({"ready": True})
    base_rss = max(base_rss, _rss_mb())  # after the framework import
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "setup":
                data = np.load(cmd["data"])
                cfg = ModelConfig.from_dict(cmd["config"])
                weights = {k: data[k] for k in cfg.param_shapes()}
                t0 = time.perf_counter()
                loss = runner.setup(cfg, weights, data["tokens"], OptimConfig(**cmd["optim"]))
                first = time.perf_counter() - t0
                warm = _timed_loop(runner.train_step, 0.0, cmd["warmup"])
                reply({"first_loss": float(loss), "first_step_s": first, "warmup_s": warm,
                       "versions": runner.versions(), "device": runner.device()})
            elif op == "train":
                reset_peak_rss()
                times = _timed_loop(runner.train_step, cmd["seconds"], cmd["min_steps"])
                reply({"times": times, "peak_rss_mb": _rss_mb("VmHWM") - base_rss})
            elif op == "forward":
                if cmd.get("warmup"):
                    runner.forward()
                reply({"times": _timed_loop(runner.forward, cmd["seconds"], cmd["min_steps"])})
            elif op == "generate":
                prompt = np.asarray(cmd["prompt"], dtype=np.int64)
                runner.generate(prompt, 2)  # warm-up (and compile)
                t0 = time.perf_counter()
                out = runner.generate(prompt, cmd["new_tokens"])
                reply({"seconds": time.perf_counter() - t0, "tokens": out})
            elif op == "matmul":
                reply({"gflops": runner.matmul_gflops()})
            elif op == "memory":
                reply({"framework_peak_mb": runner.framework_peak_mb()})
            elif op == "quit":
                reply({"bye": True})
                return
        except Exception as err:  # reported to the parent, which marks the engine failed
            reply({"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]})
            if op == "setup":
                return


# ===== parent side =============================================================================

class _Worker:
    """A worker process and its line protocol."""

    def __init__(self, name: str, workdir: Path):
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if ENGINES[name].framework == "torch":
            # PyTorch as users run it: no OpenBLAS preloaded into its process (its MKL BLAS
            # calls would bind to it), no allocator change.
            env["TINYLM_BLAS"] = "off"
            env["TINYLM_ALLOCATOR"] = "off"
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_tinylm.bench", "--worker", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=env, bufsize=1)

    def read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait()
            return {"error": f"worker exited with code {self.proc.returncode}: "
                             f"{self.stderr_tail()}"}
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            return {"error": f"worker is gone: {self.stderr_tail()}"}
        return self.read()

    def stderr_tail(self) -> str:
        self._stderr.flush()
        lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines()
                 if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(op="quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._stderr.close()


def _summary(times: list[float], tokens: int) -> dict[str, float | int]:
    rates = [tokens / t for t in times]
    return {"median": float(np.median(rates)), "min": float(min(rates)),
            "max": float(max(rates)), "steps": len(rates)}


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        if sys.platform == "darwin":
            try:
                cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                     capture_output=True, text=True).stdout.strip() or cpu
            except OSError:
                pass
    from .device import total_memory_bytes

    return {"system": platform.system(), "machine": platform.machine(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gb": round(total_memory_bytes() / 2**30, 1),
            "python": platform.python_version()}


def machine_slug(machine: dict[str, Any]) -> str:
    words = "".join(c if c.isalnum() else "-" for c in machine["cpu"].lower()).split("-")
    cpu = "-".join(w for w in words if w)[:24].strip("-")
    system, arch = machine["system"].lower(), machine["machine"].lower()
    return f"{system}-{arch}-{cpu}-{machine['cpu_count']}cpu"


def default_output_path(result: dict[str, Any]) -> Path:
    stamp = result["date"][:16].replace(":", "").replace("T", "-")
    name = f"bench-{stamp}-{machine_slug(result['machine'])}.json"
    return (RESULTS_DIR if RESULTS_DIR.parent.exists() else Path.cwd()) / name


def run_bench(preset_name: str = DEFAULT_PRESET, engines: list[str] | str = "mlx,torch,numpy",
              batch_size: int = 32, context: int | None = None, seconds: float = 10.0,
              rounds: int | None = None, warmup: int = 2, seed: int = 0, mlp: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return every figure as a JSON-ready dict (see the module doc).

    `seconds`: training time per engine, split over `rounds` interleaved rounds (default: one
    per 2 seconds, at least 3); forward-only gets a third of it. `mlp` overrides the preset's
    MLP kind. Engines that cannot run here are reported as skipped, failures as failed.
    """
    say = progress or (lambda _msg: None)
    names = parse_engines(engines) if isinstance(engines, str) else parse_engines(",".join(engines))
    base = preset(preset_name)
    cfg = base if context is None else base.with_(context_length=int(context))
    if mlp is not None:
        cfg = cfg.with_(mlp=mlp)
    if batch_size < 1:
        raise BenchError(f"batch size must be at least 1, got {batch_size}")
    if seconds <= 0:
        raise BenchError(f"--seconds must be > 0, got {seconds}")
    t = cfg.context_length
    rounds = max(3, round(seconds / 2)) if rounds is None else max(1, int(rounds))
    opt = OptimConfig()
    from . import fastnp

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch_size, t + 1), dtype=np.int64)
    weights = fastnp.init_weights(cfg, seed)
    prompt_len = max(1, min(16, t // 4))
    new_tokens = max(1, min(64, t - prompt_len))
    prompt = tokens[0, :prompt_len]
    tokens_per_step = batch_size * t
    load_before = _loadavg()
    result: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["tinylm", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"]
        else " ".join(sys.argv),
        "machine": machine_description(),
        "versions": {"mlx_tinylm": _package_version(), "numpy": np.__version__},
        "preset": preset_name, "config": cfg.to_dict(), "optim": _optim_dict(opt),
        "batch_size": batch_size, "context": t, "tokens_per_step": tokens_per_step,
        "params": cfg.n_params, "flops_per_token": cfg.flops_per_token(t),
        "seconds_per_engine": seconds, "rounds": rounds, "warmup_steps": warmup,
        "generation": {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "batch": 1},
    }
    records: dict[str, dict[str, Any]] = {
        n: {"name": n, "label": ENGINES[n].label, "framework": ENGINES[n].framework,
            "compiled": ENGINES[n].compiled, "status": "ok"} for n in names}
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as tmp:
        workdir = Path(tmp)
        data_path = workdir / "data.npz"
        np.savez(data_path, tokens=tokens, **weights)
        workers: dict[str, _Worker] = {}

        def fail(name: str, reply: dict) -> None:
            rec = records[name]
            if "skip" in reply:
                rec.update(status="skipped", reason=reply["skip"])
            else:
                rec.update(status="failed", reason=reply.get("error", "unknown error"))
            say(f"{name}: {rec['status']} ({rec['reason']})")
            w = workers.pop(name, None)
            if w is not None:
                w.close()

        try:
            say(f"starting {', '.join(names)}")
            for n in names:  # all at once: their imports overlap
                workers[n] = _Worker(n, workdir)
            for n in names:
                reply = workers[n].read()
                if "ready" not in reply:
                    fail(n, reply)
            for n in list(workers):
                say(f"{n}: first step{' (compiling)' if ENGINES[n].compiled else ''}")
                reply = workers[n].ask(op="setup", data=str(data_path), config=cfg.to_dict(),
                                       optim=_optim_dict(opt), warmup=warmup)
                if "error" in reply:
                    fail(n, reply)
                    continue
                records[n].update(first_loss=reply["first_loss"],
                                  first_step_s=reply["first_step_s"], device=reply["device"])
                result["versions"].update(reply["versions"])
            # Each round: a matmul-peak probe, then a slice of training, engine after engine, so
            # a machine busy with other work slows every engine alike. The best probe counts.
            peaks: dict[str, float] = {}
            train_times: dict[str, list[float]] = {n: [] for n in workers}
            peak_rss: dict[str, float] = {}
            for r in range(rounds):
                for n in list(workers):
                    say(f"round {r + 1}/{rounds}: training {n}")
                    reply = workers[n].ask(op="matmul")
                    if "error" in reply:
                        fail(n, reply)
                        continue
                    peaks[n] = max(peaks.get(n, 0.0), reply["gflops"])
                    reply = workers[n].ask(op="train", seconds=seconds / rounds, min_steps=1)
                    if "error" in reply:
                        fail(n, reply)
                        continue
                    train_times[n] += reply["times"]
                    peak_rss[n] = max(peak_rss.get(n, 0.0), reply["peak_rss_mb"])
            fwd_times: dict[str, list[float]] = {n: [] for n in workers}
            fwd_rounds = max(1, rounds // 2)
            for r in range(fwd_rounds):
                for n in list(workers):
                    say(f"forward round {r + 1}/{fwd_rounds}: {n}")
                    reply = workers[n].ask(op="forward", seconds=seconds / 3 / fwd_rounds,
                                           min_steps=1, warmup=r == 0)
                    if "error" in reply:
                        fail(n, reply)
                        continue
                    fwd_times[n] += reply["times"]
            gen: dict[str, dict] = {}
            for n in list(workers):
                say(f"generating with {n}")
                reply = workers[n].ask(op="generate", prompt=prompt.tolist(),
                                       new_tokens=new_tokens)
                if "error" in reply:
                    fail(n, reply)
                    continue
                gen[n] = reply
            for n in list(workers):
                reply = workers[n].ask(op="memory")
                rec = records[n]
                flops = cfg.flops_per_token(t)
                train = _summary(train_times[n], tokens_per_step)
                peak = peaks.get(n)
                rec.update(
                    train_tok_s=train,
                    forward_tok_s=_summary(fwd_times[n], tokens_per_step),
                    generate_tok_s=new_tokens / gen[n]["seconds"],
                    generated=gen[n]["tokens"],
                    peak_mem_mb=round(peak_rss.get(n, float("nan")), 1),
                    framework_peak_mb=reply.get("framework_peak_mb"),
                    matmul_peak_gflops=peak,
                    mfu=(train["median"] * flops / (peak * 1e9)) if peak else None,
                )
        finally:
            for w in workers.values():
                w.close()
    result["engines"] = [records[n] for n in names]
    result["load_average"] = {"before": load_before, "after": _loadavg()}
    _add_ratios(result)
    result["agreement"] = _agreement(result["engines"])
    return result


def _add_ratios(result: dict[str, Any]) -> None:
    base = next((e for e in result["engines"] if e["name"] == BASELINE and e["status"] == "ok"),
                None)
    for e in result["engines"]:
        if e["status"] != "ok" or base is None:
            e["vs_torch_eager"] = None
            continue
        e["vs_torch_eager"] = {
            "train": e["train_tok_s"]["median"] / base["train_tok_s"]["median"],
            "forward": e["forward_tok_s"]["median"] / base["forward_tok_s"]["median"],
            "generate": e["generate_tok_s"] / base["generate_tok_s"]}


def _agreement(engines: list[dict[str, Any]]) -> dict[str, Any]:
    losses = {e["name"]: e["first_loss"] for e in engines if "first_loss" in e}
    spread = (max(losses.values()) - min(losses.values())) if losses else 0.0
    return {"first_step_losses": losses, "max_abs_diff": spread,
            "tolerance": AGREEMENT_TOLERANCE, "passed": spread <= AGREEMENT_TOLERANCE,
            "compared": len(losses)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _optim_dict(opt: OptimConfig) -> dict[str, Any]:
    return {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
            "weight_decay": opt.weight_decay, "grad_clip": opt.grad_clip}


def _package_version() -> str:
    from . import __version__

    return __version__


def save_result(result: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write the JSON (to benchmarks/results/bench-<date>-<machine>.json by default)."""
    out = Path(path) if path is not None else default_output_path(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


# ----- presentation ------------------------------------------------------------------------------

def _fmt_rate(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x / 1000:.2f}k" if x >= 1000 else f"{x:.0f}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (shared by the rich table and Markdown)."""
    header = ["engine", "train tok/s", "min–max", "× torch eager", "forward tok/s",
              "generate tok/s", "peak MB", "MFU (peak GFLOP/s)", "first loss"]
    rows = []
    for e in result["engines"]:
        if e["status"] != "ok":
            rows.append([e["label"], e["status"], e.get("reason", "")] + [""] * 6)
            continue
        tr = e["train_tok_s"]
        ratio = e["vs_torch_eager"]["train"] if e["vs_torch_eager"] else None
        mfu = f"{100 * e['mfu']:.1f}% ({e['matmul_peak_gflops']:.0f})" if e["mfu"] else "-"
        rows.append([
            e["label"], _fmt_rate(tr["median"]), f"{_fmt_rate(tr['min'])}–{_fmt_rate(tr['max'])}",
            f"{ratio:.2f}×" if ratio is not None else "-",
            _fmt_rate(e["forward_tok_s"]["median"]), _fmt_rate(e["generate_tok_s"]),
            f"{e['peak_mem_mb']:.0f}", mfu, f"{e['first_loss']:.5f}"])
    return header, rows


def summary_line(result: dict[str, Any]) -> str:
    cfg = result["config"]
    m = result["machine"]
    agree = result["agreement"]
    devices = ", ".join(f"{e['label']}: {e['device']}" for e in result["engines"]
                        if e["status"] == "ok")
    load = result.get("load_average") or {}
    return (f"preset {result['preset']} (d{cfg['d_model']} L{cfg['n_layers']} H{cfg['n_heads']} "
            f"{cfg['mlp']}, vocab {cfg['vocab_size']}, {result['params'] / 1e6:.2f}M params), "
            f"batch {result['batch_size']} × context {result['context']}; {m['cpu']}, "
            f"{m['cpu_count']} cores, load average {(load.get('before') or ['?'])[0]}; "
            f"devices: {devices}; first-step losses agree to {agree['max_abs_diff']:.1e} "
            f"({'pass' if agree['passed'] else 'FAIL'}, tolerance {agree['tolerance']:g})")


def to_markdown(result: dict[str, Any]) -> str:
    header, rows = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + summary_line(result) + "\n"


# ----- engine choice for training ----------------------------------------------------------------

def fastest_engine(cfg: ModelConfig, batch: int, context: int | None = None, steps: int = 1,
                   use_cache: bool = True) -> str:
    """'mlx' or 'numpy': whichever trains this model faster here, measured over a few steps.

    MLX on a GPU (Metal, CUDA) is always the answer, and so is it for an architecture the fast
    NumPy engine does not implement (the reference would be far slower). Otherwise both engines
    take one warm-up (compile) step and `steps` timed steps on random tokens; the faster wins.
    The answer is remembered per machine, versions, model and batch in the cache folder
    (`engine-choice.json`), so only the first run of a configuration pays for the measurement.
    """
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        return "mlx"
    from .engine import fast_numpy_supports

    if not fast_numpy_supports(cfg):  # 'numpy' would mean the slow reference engine
        return "mlx"
    t = cfg.context_length if context is None else context
    cache_file, key = _engine_choice_key(cfg, batch, t)
    if use_cache:
        try:
            return json.loads(cache_file.read_text())[key]["engine"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    timings = _time_training_engines(cfg, batch, t, steps)
    choice = min(timings, key=timings.get)
    if use_cache:
        try:
            known = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        except (OSError, ValueError):
            known = {}
        known[key] = {"engine": choice, "step_seconds": timings,
                      "date": _dt.datetime.now().isoformat(timespec="seconds")}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only cache only costs the measurement next time
    return choice


def _engine_choice_key(cfg: ModelConfig, batch: int, context: int) -> tuple[Path, str]:
    import mlx.core as mx

    from .data import cache_dir

    machine = machine_description()
    key = json.dumps({"config": cfg.to_dict(), "batch": batch, "context": context,
                      "cpu": machine["cpu"], "cores": machine["cpu_count"],
                      "mlx": mx.__version__, "numpy": np.__version__,
                      "mlx_tinylm": _package_version()}, sort_keys=True)
    return cache_dir() / "engine-choice.json", key


def _time_training_engines(cfg: ModelConfig, batch: int, t: int, steps: int
                           ) -> dict[str, float]:
    """Median seconds per training step of MLX and the NumPy engine, after one warm-up step."""
    import mlx.core as mx

    from . import fastnp
    from . import model as M

    cfg = cfg.with_(context_length=max(t, cfg.context_length))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, t + 1))
    opt = OptimConfig()
    weights = fastnp.init_weights(cfg, 0)

    m = M.GPT(cfg)
    m.load_named_weights({k: mx.array(v) for k, v in weights.items()})
    optimizer = M.make_optimizer(opt)
    step = M.make_train_step(m, optimizer, opt.grad_clip)
    x, y = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])

    def mlx_step() -> None:
        mx.eval(step(x, y), m.state, optimizer.state)

    np_model = fastnp.GPT(cfg, weights)
    np_step = fastnp.make_train_step(np_model, fastnp.AdamW(opt), opt.grad_clip)

    def numpy_step() -> None:
        np_step(tokens[:, :-1], tokens[:, 1:])

    timings = {}
    for name, fn in (("mlx", mlx_step), ("numpy", numpy_step)):
        fn()
        timings[name] = float(np.median(_timed_loop(fn, 0.0, steps)))
    return timings


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker" and sys.argv[2] in ENGINES:
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m mlx_tinylm.bench --worker ENGINE (internal; use tinylm bench)")
