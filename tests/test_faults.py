"""Faults a laptop run meets: a full disk, a stale or live lock, a model too big for memory,
SIGTERM, and a second Ctrl-C while the interrupted run is saving."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_clean_failure, run_cli

import mlx_tinylm  # noqa: F401  (sets up BLAS before MLX)
from mlx_tinylm import checkpoint
from mlx_tinylm import train as training
from mlx_tinylm.config import ModelConfig, OptimConfig, TrainConfig
from mlx_tinylm.device import available_memory_bytes
from mlx_tinylm.errors import TinyLMError

TINY_FLAGS = ["--d-model", "32", "--layers", "2", "--heads", "2", "--context", "32",
              "--batch-size", "8", "--no-dashboard", "--engine", "mlx"]
CFG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, context_length=32)


def random_state(seed: int) -> tuple[dict, dict, dict]:
    """Weights, optimizer moments and loop state shaped like a real checkpoint of CFG."""
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in CFG.param_shapes().items()}
    optimizer = {f"states.0.{k}.{m}": rng.standard_normal(w.shape).astype(np.float32)
                 for k, w in weights.items() for m in "mv"}
    optimizer["states.0.step"] = np.array(seed, dtype=np.uint64)
    return weights, optimizer, {"loop": {"step": seed}}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


# ----- disk full ---------------------------------------------------------------------------------

@contextmanager
def small_disk(path: Path, size: int):
    """A tiny RAM file system at `path`, yielding True; as a normal user (or where mounting is not
    allowed) `path` is a plain folder and it yields False: the caller then simulates a full disk
    with /dev/full, which answers every write with ENOSPC."""
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill the file system holding `disk` until only `leave` bytes are free."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))


def send_exports_to_dev_full(run: Path) -> None:
    """Simulated full disk: the next export of model.safetensors writes into /dev/full."""
    while True:
        try:
            (run / (checkpoint.WEIGHTS + ".tmp")).symlink_to("/dev/full")
            return
        except FileExistsError:  # an export is being written right now; the next one
            time.sleep(0.001)


def test_full_disk_keeps_the_previous_checkpoint_bit_exact(tmp_path):
    weights, optimizer, state = random_state(1)
    size = sum(a.nbytes for a in (*weights.values(), *optimizer.values()))
    # Room for one checkpoint and its exported weights (4/3 of it), not for a second one.
    with small_disk(tmp_path / "disk", int(1.6 * size)) as real:
        run = tmp_path / "disk" / "run"
        run.mkdir()
        checkpoint.save_checkpoint(run, weights, optimizer, state)
        if not real:
            send_exports_to_dev_full(run)
        with pytest.raises(checkpoint.DiskFullError) as err:
            checkpoint.save_checkpoint(run, *random_state(2))
        check_disk_full_error(str(err.value), run, size)
        if real:  # the failed save never touched the previous checkpoint
            assert_same(checkpoint.load_checkpoint(run)[0], weights)
            assert_same(checkpoint.load_checkpoint(run)[1], optimizer)
        else:  # /dev/full only fails the export, after the new checkpoint is complete
            assert_same(checkpoint.load_checkpoint(run)[0], random_state(2)[0])
        assert_same(checkpoint.load_arrays(run / checkpoint.WEIGHTS), weights)
        assert not (run / "checkpoint.new").exists()


def check_disk_full_error(message: str, run: Path, size: int) -> None:
    assert "\n" not in message
    assert f"disk holding {run}:" in message
    needed = float(re.search(r"needs about ([\d.]+) MiB", message).group(1))
    assert size / 2**20 <= needed <= size / 2**20 + 0.2  # the checkpoint's real size
    assert "--resume" in message


def test_training_onto_a_disk_that_fills_up_stops_with_one_line_and_a_loadable_checkpoint(
        prepared, tmp_path):
    with small_disk(tmp_path / "disk", 16 * 2**20) as real:
        run = tmp_path / "disk" / "run"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_tinylm", "train", "--data", str(prepared.path),
             "--minutes", "2", *TINY_FLAGS, "--checkpoint-every", "0.003", "--out", str(run)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while checkpoint.checkpoint_dir(run) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        if real:
            fill(run.parent, 64 * 1024)  # the metrics log still fits, a checkpoint does not
        else:
            send_exports_to_dev_full(run)
        out, err = proc.communicate(timeout=60)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_clean_failure(result, f"no space left on the disk holding {run}")
        assert re.search(r"needs about [\d.]+ MiB, [\d.]+ MiB free", err), err
        weights, _, state = checkpoint.load_checkpoint(run)  # the last one is intact
        checkpoint.check_weights(weights, CFG.param_shapes(), run)
        assert state["loop"]["step"] > 0
        assert not (run / "checkpoint.new").exists()


# ----- locks -------------------------------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    for content in (str(dead_pid()), "", "garbage\n"):
        (tmp_path / checkpoint.LOCK).write_text(content)
        warnings: list[str] = []
        with checkpoint.run_lock(tmp_path, warn=warnings.append):
            assert (tmp_path / checkpoint.LOCK).read_text() == str(os.getpid())
        assert len(warnings) == 1 and "stale lock" in warnings[0], warnings
        if content.isdigit():
            assert f"PID {content} is gone" in warnings[0]
        assert not (tmp_path / checkpoint.LOCK).exists()


def test_a_lock_held_by_a_live_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / checkpoint.LOCK).write_text(str(holder.pid))
        with pytest.raises(checkpoint.CheckpointError, match=f"in use .*PID {holder.pid}"):
            with checkpoint.run_lock(tmp_path):
                pass
        assert (tmp_path / checkpoint.LOCK).read_text() == str(holder.pid)  # left alone
    finally:
        holder.kill()
        holder.wait()


# ----- memory guard ------------------------------------------------------------------------------

def test_memory_guard_gives_the_estimate_and_the_limit_and_force_overrides_it(prepared, tmp_path):
    huge = {"d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 200_000}
    train_cfg = TrainConfig(steps=1, batch_size=8, engine="mlx")
    model = ModelConfig(vocab_size=prepared.vocab_size, **huge)
    needed = model.training_memory_bytes(8)
    assert needed > available_memory_bytes()
    with pytest.raises(TinyLMError) as err:
        training.build_spec(prepared, preset="tiny", overrides=huge, optim=OptimConfig(),
                            train_cfg=train_cfg, out=tmp_path / "a")
    message = str(err.value)
    assert f"about {needed / 2**30:.1f} GiB" in message
    assert re.search(r"but [\d.]+ GiB is available", message) and "--force" in message
    spec = training.build_spec(prepared, preset="tiny", overrides=huge, optim=OptimConfig(),
                               train_cfg=train_cfg, out=tmp_path / "a", force=True)
    assert spec.model == model

    # Through the CLI: refused; with --force it gets past the guard (and stops at the next
    # check, because 200k tokens of context do not fit in this small data set).
    args = ["train", "--data", str(prepared.path), "--steps", "1", *TINY_FLAGS,
            "--context", "200000"]
    with ThreadPoolExecutor(2) as pool:
        refused, forced = pool.map(lambda extra: run_cli(*args, *extra),
                                   [["--out", str(tmp_path / "b")],
                                    ["--out", str(tmp_path / "c"), "--force"]])
    assert_clean_failure(refused, f"needs about {needed / 2**30:.1f} GiB")
    assert_clean_failure(forced, "fewer than one window")


# ----- signals -----------------------------------------------------------------------------------

def start_training(data: Path, run: Path, delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_tinylm", "train", "--data", str(data),
         "--minutes", "2", *TINY_FLAGS, "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
             checkpoint._DELAY_ENV: str(delay)})


def wait_for_training(proc: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 60
    while not any(r.get("event") == "step" for r in checkpoint.read_metrics(run)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_interrupted(result: subprocess.CompletedProcess, run: Path) -> None:
    """Exit 130, one line naming the step, and a complete checkpoint at exactly that step."""
    assert result.returncode == 130, result.stderr
    assert_clean_failure(result, "interrupted at step")
    step = int(re.search(r"interrupted at step (\d+)", result.stderr).group(1))
    weights, optimizer, state = checkpoint.load_checkpoint(run)
    checkpoint.check_weights(weights, CFG.param_shapes(), run)
    assert state["loop"]["step"] == step > 0 and optimizer
    assert not (run / "checkpoint.new").exists() and not (run / checkpoint.LOCK).exists()


def test_sigterm_saves_and_exits_130_like_ctrl_c(prepared, tmp_path):
    run = tmp_path / "run"
    proc = start_training(prepared.path, run)
    wait_for_training(proc, run)
    proc.send_signal(signal.SIGTERM)
    check_interrupted(finish(proc), run)


def test_a_second_ctrl_c_during_the_save_does_not_corrupt_it(prepared, tmp_path):
    run = tmp_path / "run"
    # Each save holds its checkpoint half written for 1 s: time for a second Ctrl-C.
    proc = start_training(prepared.path, run, delay=1.0)
    wait_for_training(proc, run)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while not (run / "checkpoint.new").exists():  # the interrupted run is now saving
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    check_interrupted(finish(proc), run)


def test_sigterm_before_training_starts_is_a_one_line_exit_130(prepared, tmp_path):
    run = tmp_path / "run"
    proc = start_training(prepared.path, run)
    deadline = time.monotonic() + 60
    while not run.exists():  # inside train(), before the loop and its signal handler
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert result.returncode == 130
    assert_clean_failure(result, "interrupted")
    assert not (run / checkpoint.LOCK).exists()


def test_ctrl_c_during_the_final_save_keeps_it_and_exits_130(prepared, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_tinylm", "train", "--data", str(prepared.path),
         "--steps", "3", *TINY_FLAGS, "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), checkpoint._DELAY_ENV: "1.0"})
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.new").exists():  # the one save: after the last step
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    result = finish(proc)
    assert result.returncode == 130
    assert_clean_failure(result, "interrupted after its last step (3)")
    _, _, state = checkpoint.load_checkpoint(run)
    assert state["loop"]["step"] == 3
    assert not (run / "README.md").exists()  # the final evaluation was skipped
