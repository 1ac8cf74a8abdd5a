"""Soak: a long run of the default model, watching memory and throughput for drift (not CI).

    python benchmarks/soak.py                                   # 30 minutes, default model
    python benchmarks/soak.py --minutes 2 --early-minute 0.5 --window 0.25   # a quick check
    python benchmarks/soak.py --json benchmarks/results/soak-$(date +%F).json

It trains the default preset (`tiny`; `--preset auto` for the planner's pick) with everything
`tinylm train` does by default (batch, schedule, periodic evaluation, samples, checkpoints) on the
shared TinyStories files, and records at every logged
step: the process's peak and current resident memory, MLX's active memory and tokens so far. At
the end it reports

- peak memory at `--early-minute` (default 5) and at the end, and their ratio (goal: within 5%);
- current resident memory at the same two points (a leak shows here first);
- throughput per minute of training (`--window`), and how far the slowest and fastest windows
  after the first are from their median (goal: steady).

Minutes are budget minutes: the training clock, which evaluation and checkpoints pause.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "tinystories"

import mlx_tinylm  # noqa: E402, F401  (sets up BLAS before MLX)
from mlx_tinylm import train as training  # noqa: E402
from mlx_tinylm.config import DEFAULT_PRESET, OptimConfig, TrainConfig  # noqa: E402
from mlx_tinylm.dashboard import PlainLog  # noqa: E402
from mlx_tinylm.engine import current_rss_bytes  # noqa: E402


class SoakLog(PlainLog):
    """Plain log lines every 30 s, and a memory/throughput record at every logged step."""

    def __init__(self) -> None:
        super().__init__(every_s=30.0)
        self.records: list[dict[str, Any]] = []

    def step(self, m: dict[str, Any]) -> None:
        import mlx.core as mx

        self.records.append({"step": m["step"], "elapsed": m["elapsed"], "tokens": m["tokens"],
                             "peak_mem": m["peak_mem"], "rss": current_rss_bytes(),
                             "mlx_active": int(mx.get_active_memory()),
                             "mlx_cache": int(mx.get_cache_memory()),
                             "wall": time.monotonic()})
        super().step(m)


def at_minute(records: list[dict[str, Any]], minute: float) -> dict[str, Any]:
    """The first record at or after `minute` of budget time (the last one if none)."""
    return next((r for r in records if r["elapsed"] >= minute * 60), records[-1])


def windowed_throughput(records: list[dict[str, Any]], window_s: float) -> list[float]:
    """Training tok/s over each window of budget time (a last partial one if over half full)."""
    out = []
    start, end = records[0], window_s
    for r in records:
        if r["elapsed"] >= end and r["elapsed"] > start["elapsed"]:
            out.append((r["tokens"] - start["tokens"]) / (r["elapsed"] - start["elapsed"]))
            start, end = r, end + window_s
    last = records[-1]
    if last["elapsed"] - start["elapsed"] >= window_s / 2:
        out.append((last["tokens"] - start["tokens"]) / (last["elapsed"] - start["elapsed"]))
    return out


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def point(r: dict[str, Any]) -> dict[str, float]:
    """Memory at one record, in MiB: process peak, resident now, MLX arrays, MLX buffer cache."""
    return {"minute": round(r["elapsed"] / 60, 2), "peak_mib": mib(r["peak_mem"]),
            "rss_mib": mib(r["rss"]), "mlx_active_mib": mib(r["mlx_active"]),
            "mlx_cache_mib": mib(r["mlx_cache"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget")
    parser.add_argument("--early-minute", type=float, default=5.0,
                        help="the early point memory is compared with")
    parser.add_argument("--window", type=float, default=1.0,
                        help="minutes per throughput window")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--data", help="a prepared data folder (default: the shared files)")
    parser.add_argument("--files", nargs="+", default=[str(DATA / "train.txt"),
                                                       str(DATA / "train_more.txt")])
    parser.add_argument("--val-files", nargs="+", default=[str(DATA / "valid.txt")])
    parser.add_argument("--out", help="run folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    data = training.load_data(args.data, None if args.data else args.files,
                              None if args.data else args.val_files)
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(args.out) if args.out else Path(tmp.name) / "soak"  # type: ignore[union-attr]
    spec = training.build_spec(data, preset=args.preset, overrides={}, optim=OptimConfig(),
                               train_cfg=TrainConfig(minutes=args.minutes, engine=args.engine),
                               out=out)
    log = SoakLog()
    wall = time.monotonic()
    summary = training.train(spec, data, log)
    wall = time.monotonic() - wall

    rec = log.records
    early, end = at_minute(rec, args.early_minute), rec[-1]
    windows = windowed_throughput(rec, args.window * 60)
    steady = windows[1:] or windows  # the first window holds compilation
    median = statistics.median(steady) if steady else 0.0
    result = {
        "date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
        "machine": f"{os.cpu_count()} cores", "preset": args.preset, "engine": summary["engine"],
        "params": summary["params"], "budget_minutes": args.minutes,
        "wall_minutes": round(wall / 60, 2), "steps": summary["steps"],
        "tokens": summary["tokens"], "val_bpb": summary["val_bpb"],
        "early": point(early), "end": point(end),
        "peak_ratio_end_to_early": round(end["peak_mem"] / early["peak_mem"], 4),
        "rss_ratio_end_to_early": round(end["rss"] / early["rss"], 4),
        "window_minutes": args.window,
        "tok_s_per_window": [round(x) for x in windows],
        "tok_s_median": round(median),
        "tok_s_spread": ([round(min(steady) / median - 1, 4), round(max(steady) / median - 1, 4)]
                         if steady else None),
    }
    print(json.dumps(result, indent=2))
    ok_mem = result["peak_ratio_end_to_early"] <= 1.05
    print(f"peak memory {result['early']['peak_mib']} MiB at minute {result['early']['minute']} "
          f"-> {result['end']['peak_mib']} MiB at minute {result['end']['minute']} "
          f"({'within' if ok_mem else 'NOT within'} 5%); throughput per {args.window:g} min "
          f"{result['tok_s_per_window']} tok/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
