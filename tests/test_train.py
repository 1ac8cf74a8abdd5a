"""The budgeted training loop: runs, schedules, checkpoints, resumes, refuses and guards."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, assert_clean_failure, run_cli

import mlx_tinylm  # noqa: F401  (sets up BLAS before MLX)
from mlx_tinylm import checkpoint
from mlx_tinylm import train as training
from mlx_tinylm.config import OptimConfig, TrainConfig
from mlx_tinylm.dashboard import PlainLog
from mlx_tinylm.schedule import Schedule

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 32}
TINY_FLAGS = ["--d-model", "32", "--layers", "2", "--heads", "2", "--context", "32",
              "--batch-size", "8", "--no-dashboard"]


class Recorder(PlainLog):
    """A real reporter that also keeps every record it was given."""

    def __init__(self, on_step=None):
        super().__init__(io.StringIO())
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.summary: dict = {}
        self.on_step = on_step

    def step(self, m):
        self.steps.append(m)
        if self.on_step:
            self.on_step(m)

    def evaluation(self, m):
        self.evals.append(m)

    def finish(self, summary):
        self.summary = summary


def make_spec(prepared, out: Path, engine: str = "mlx", **train_changes) -> training.RunSpec:
    base = TrainConfig(minutes=None, steps=40, batch_size=8, engine=engine, eval_batches=2,
                       sample_tokens=8, log_every_s=0.0, checkpoint_every_minutes=10)
    return training.build_spec(prepared, preset="tiny", overrides=TINY, optim=OptimConfig(lr=3e-3),
                               train_cfg=replace(base, **train_changes), out=out)


def test_schedule_warms_up_holds_and_ends_at_final_value():
    s = Schedule(peak_lr=1e-3, warmup=0.1, decay=0.5, final_frac=0.1)
    assert s(0.0) == 0.0
    assert s(0.05) == pytest.approx(5e-4)
    assert s(0.3) == pytest.approx(1e-3)
    assert s(0.75) == pytest.approx(1e-3 - 0.5 * 0.9e-3)
    assert s(1.0) == pytest.approx(1e-4)
    assert s.final_lr == pytest.approx(1e-4)


def test_timed_run_learns_writes_a_complete_run_folder_and_ends_annealed(prepared, tmp_path):
    spec = make_spec(prepared, tmp_path / "run", minutes=0.12, steps=None, eval_every=0.25)
    rec = Recorder()
    summary = training.train(spec, prepared, rec)
    losses = [m["loss"] for m in rec.steps]
    assert len(losses) > 20
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # it learned
    # The last step ran at the schedule's final value, and the budget was respected.
    assert rec.steps[-1]["lr"] == pytest.approx(Schedule(3e-3, 0.03, 0.4, 0.0).final_lr)
    assert summary["train_seconds"] <= 0.12 * 60 + 1.0
    assert len(rec.evals) >= 2, "periodic validation ran"
    assert rec.evals[-1]["val_loss"] < rec.evals[0]["val_loss"] - 0.2  # sees the new weights
    assert summary["val_loss"] < rec.evals[0]["val_loss"]
    run = spec.run_dir
    for name in ("config.json", "model.safetensors", "tokenizer.model", "metrics.jsonl",
                 "loss.png", "README.md"):
        assert (run / name).is_file(), name
    assert checkpoint.checkpoint_dir(run) is not None
    weights = checkpoint.load_arrays(run / "model.safetensors")
    assert set(weights) == set(spec.model.param_shapes())
    for key in ("val_loss", "val_ppl", "val_bpb"):
        assert math.isfinite(summary[key])
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert not (run / checkpoint.LOCK).exists()


def test_steps_run_ends_at_final_learning_rate(prepared, tmp_path):
    rec = Recorder()
    spec = make_spec(prepared, tmp_path / "run", steps=12, final_lr_frac=0.1)
    training.train(spec, prepared, rec)
    assert rec.steps[-1]["step"] == 12
    assert rec.steps[-1]["lr"] == pytest.approx(3e-4)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(prepared, tmp_path):
    whole = make_spec(prepared, tmp_path / "whole", steps=30)
    training.train(whole, prepared, Recorder())
    _, _, ref_state = checkpoint.load_checkpoint(whole.run_dir)

    def interrupt(m):
        if m["step"] == 13:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by the loop

    part = make_spec(prepared, tmp_path / "part", steps=30)
    with pytest.raises(training.Interrupted):
        training.train(part, prepared, Recorder(on_step=interrupt))
    _, _, mid = checkpoint.load_checkpoint(part.run_dir)
    assert mid["loop"]["step"] == 13
    spec, data = training.resume_spec(part.run_dir)
    training.train(spec, data, Recorder())
    _, _, resumed = checkpoint.load_checkpoint(part.run_dir)
    assert len(resumed["loop"]["losses"]) == 30
    for a, b in zip(ref_state["loop"]["losses"], resumed["loop"]["losses"], strict=True):
        assert abs(a - b) <= 1e-6


def test_huge_learning_rate_stops_with_a_clear_message(prepared, tmp_path):
    spec = make_spec(prepared, tmp_path / "run", steps=60)
    spec = replace(spec, optim=OptimConfig(lr=1e6, grad_clip=0.0))
    with pytest.raises(training.TrainingDiverged, match="learning rate"):
        training.train(spec, prepared, Recorder())


def test_numpy_engine_completes_a_short_run(prepared, tmp_path):
    spec = make_spec(prepared, tmp_path / "run", engine="numpy", steps=6, eval_every=0.5)
    rec = Recorder()
    summary = training.train(spec, prepared, rec)
    assert summary["engine"] == "numpy" and summary["steps"] == 6
    assert (spec.run_dir / "model.safetensors").is_file()


def test_plain_output_when_not_a_terminal(prepared, tmp_path):
    result = run_cli("train", "--data", str(prepared.path), "--steps", "8", *TINY_FLAGS,
                     "--out", str(tmp_path / "run"), "--engine", "mlx")
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # no terminal control codes
    assert "step" in result.stdout and "validation" in result.stdout


def test_ctrl_c_saves_a_loadable_checkpoint_and_exits_130(prepared, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_tinylm", "train", "--data", str(prepared.path),
         "--minutes", "2", *TINY_FLAGS, "--out", str(run), "--engine", "mlx"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while time.time() < deadline and not (run / checkpoint.METRICS).exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    weights, _, state = checkpoint.load_checkpoint(run)
    assert state["loop"]["step"] > 0 and weights


def test_a_second_process_on_the_same_run_folder_is_refused(prepared, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / checkpoint.LOCK).write_text(str(holder.pid))
        result = run_cli("train", "--data", str(prepared.path), "--steps", "4", *TINY_FLAGS,
                         "--out", str(run))
        assert_clean_failure(result, "in use")
    finally:
        holder.kill()


def test_resume_without_a_checkpoint_says_so(prepared, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.write_config(run, {"model": {}, "data": {"path": str(prepared.path)}})
    assert_clean_failure(run_cli("train", "--resume", "--out", str(run)), "no checkpoint")


def test_metrics_log_is_json_lines(prepared, tmp_path):
    spec = make_spec(prepared, tmp_path / "run", steps=5)
    training.train(spec, prepared, Recorder())
    lines = (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["event"] for r in records} >= {"step", "final"}
