"""A training run killed with SIGKILL at any moment never loses its checkpoint.

One run folder, one training process after another: each is `kill -9`ed at a random moment (while
starting, while training, while writing a checkpoint, between the two renames of the swap), and
after every kill the folder must hold no checkpoint (only before the first save) or a complete,
loadable one at least as far along as the one before; the next process resumes from it.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, assert_clean_failure, run_cli

import mlx_tinylm  # noqa: F401  (sets up BLAS before MLX)
from mlx_tinylm import checkpoint
from mlx_tinylm.config import ModelConfig

KILLS = 22
# A checkpoint every ~0.1 s, each held open for DELAY s half-written and DELAY s mid-swap, so a
# good share of every process's life is spent inside a save.
DELAY = 0.05
TRAIN_FLAGS = ["--d-model", "32", "--layers", "2", "--heads", "2", "--context", "32",
               "--batch-size", "8", "--no-dashboard", "--engine", "mlx",
               "--steps", "1000000", "--checkpoint-every", "0.002", "--eval-every", "1"]
# How each process dies: while starting (maybe before the first save), while training, while a
# checkpoint is half written, or between the renames that swap it in.
MODES = ["startup"] * 5 + ["training"] * 6 + ["save"] * 6 + ["swap"] * 5


class Training:
    """One `tinylm train` process whose output goes to a file (readable after a kill)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
               checkpoint._DELAY_ENV: str(DELAY)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlx_tinylm", *args], cwd=ROOT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"training exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"timed out waiting:\n{self.output()}"
            time.sleep(0.003)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        self.proc.wait(timeout=30)


def _state_id(run: Path) -> tuple[int, int] | None:
    """Identity of the current checkpoint's state.json: changes with every completed save."""
    try:
        st = (run / checkpoint.CHECKPOINT / checkpoint.STATE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _aside(run: Path) -> set[tuple[str, int, int]]:
    """checkpoint.new/ and checkpoint.old/ as they are now (they only exist during a save)."""
    out = set()
    for suffix in (".new", ".old"):
        try:
            st = (run / (checkpoint.CHECKPOINT + suffix)).stat()
        except OSError:
            continue
        out.add((suffix, st.st_ino, st.st_mtime_ns))
    return out


def _kill_at(mode: str, training: Training, run: Path, before: tuple | None,
             rng: random.Random) -> None:
    new, old, cur = (run / (checkpoint.CHECKPOINT + s) for s in (".new", ".old", ""))
    if mode == "startup":
        time.sleep(rng.uniform(0.05, 2.5))
    elif mode == "training":
        training.wait_for(lambda: re.search(r"^step ", training.output(), re.M))
        time.sleep(rng.uniform(0.0, 0.6))
    else:
        # Leftovers of the last kill may still be there; wait for this process's own first save.
        training.wait_for(lambda: _state_id(run) not in (None, before))
        if mode == "save":  # checkpoint.new/ exists only while a checkpoint is being written
            training.wait_for(new.exists)
            time.sleep(rng.uniform(0.0, DELAY))
        else:  # swap: the last checkpoint moved aside, the new one not yet moved in
            training.wait_for(lambda: old.exists() and not cur.exists())
    training.kill()


def test_kill_9_at_random_moments_never_loses_the_checkpoint(prepared, tmp_path):
    seed = int(os.environ.get("TINYLM_KILL_SEED", "0"))
    rng = random.Random(seed)
    modes = ["startup"] + rng.sample(MODES, len(MODES))[:KILLS - 1]
    run = tmp_path / "run"
    fresh = ["train", "--data", str(prepared.path), *TRAIN_FLAGS, "--out", str(run)]
    shapes = ModelConfig(vocab_size=prepared.vocab_size, d_model=32, n_layers=2, n_heads=2,
                         context_length=32).param_shapes()
    saved_step: int | None = None
    survived, resumed_from, said_no_checkpoint = 0, 0, False
    inside_save = 0  # kills that left a half-written checkpoint.new/ or a checkpoint.old/ behind
    for k, mode in enumerate(modes):
        if mode == "startup" and k == 0:
            mode = "first"
        args = fresh if saved_step is None else ["train", "--resume", "--out", str(run)]
        before = _state_id(run)
        aside = _aside(run)
        training = Training(args, tmp_path / f"kill{k}.log")
        if mode == "first":  # the run folder exists, the first save is still ahead
            training.wait_for(run.exists)
            time.sleep(rng.uniform(0.0, 0.1))
            training.kill()
        else:
            _kill_at(mode, training, run, before, rng)
        out = training.output()
        context = f"kill {k} ({mode}, seed {seed}):\n{out}"
        inside_save += bool(_aside(run) - aside)  # this process was inside a save when it died
        assert "Traceback" not in out, context
        if m := re.search(r"resumed at step (\d+)", out):
            assert int(m.group(1)) == saved_step, context  # it continued from the checkpoint
            resumed_from += 1

        found = checkpoint.checkpoint_dir(run)
        if found is None:
            assert saved_step is None, f"a checkpoint was lost; {context}"
            if not said_no_checkpoint and run.exists():  # and --resume says so in one line
                assert_clean_failure(run_cli("train", "--resume", "--out", str(run)),
                                     "no checkpoint")
                said_no_checkpoint = True
        else:
            weights, optimizer, state = checkpoint.load_checkpoint(run)  # complete and loadable
            checkpoint.check_weights(weights, shapes, found)
            step = state["loop"]["step"]
            assert len(state["loop"]["losses"]) == step and optimizer, context
            assert saved_step is None or step >= saved_step, context
            saved_step = step
        survived += 1

    assert said_no_checkpoint, "the first kill came before the first save"
    assert inside_save >= 8, f"only {inside_save} kills landed inside a checkpoint write"
    assert resumed_from >= 5, f"only {resumed_from} killed runs got as far as resuming"
    # A last process takes over the dead one's lock, continues and stops cleanly on Ctrl-C.
    training = Training(["train", "--resume", "--out", str(run)], tmp_path / "last.log")
    before = saved_step
    training.wait_for(lambda: (state := _saved_step(run)) is not None and state > before)
    training.proc.send_signal(2)
    assert training.proc.wait(timeout=60) == 130, training.output()
    out = training.output()
    assert f"resumed at step {before}" in out and "stale lock" in out, out
    assert "Traceback" not in out
    _, _, state = checkpoint.load_checkpoint(run)
    assert state["loop"]["step"] > before
    print(f"kills survived {survived}/{KILLS} (seed {seed}); {inside_save} inside a checkpoint "
          f"write; {resumed_from} resumed before dying")
    assert survived == KILLS


def _saved_step(run: Path) -> int | None:
    path = checkpoint.checkpoint_dir(run)
    if path is None:
        return None
    try:
        return checkpoint.read_json(path / checkpoint.STATE)["loop"]["step"]
    except (checkpoint.CheckpointError, KeyError):
        return None  # renamed away between the two calls
