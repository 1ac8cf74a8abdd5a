"""Training memory per preset, each in a fresh process, against the config module's estimate.

    python benchmarks/memory.py --data ~/.cache/mlx-tinylm/data/train-v4096-...   # all presets
    python benchmarks/memory.py --data DIR --presets nano tiny --json out.json

A fresh process per size, because a process keeps the memory a smaller run freed (the allocator
is told to keep large buffers) and a later size would look smaller than it is. In each child:
load the data, build the run, note the resident memory, train `--tokens` tokens and read the peak
resident memory; what training added is compared with `ModelConfig.training_memory_bytes` for
the engine the run used (the planner's memory column and `train`'s memory guard).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(name: str, data_dir: str, tokens: int) -> dict:
    import mlx_tinylm  # noqa: F401  (BLAS set-up before MLX)
    from mlx_tinylm import train as training
    from mlx_tinylm.config import OptimConfig, TrainConfig
    from mlx_tinylm.dashboard import PlainLog
    from mlx_tinylm.data import load_prepared
    from mlx_tinylm.engine import current_rss_bytes, process_peak_rss_bytes, reset_peak_rss

    data = load_prepared(data_dir)
    with tempfile.TemporaryDirectory() as tmp, open("/dev/null", "w") as quiet:
        spec = training.build_spec(data, preset=name, overrides={}, optim=OptimConfig(),
                                   train_cfg=TrainConfig(minutes=None, tokens=tokens,
                                                         sample_tokens=0),
                                   out=Path(tmp) / "run")
        before = current_rss_bytes()
        reset_peak_rss()
        training.train(spec, data, PlainLog(stream=quiet))
        used = process_peak_rss_bytes() - before
    estimate = spec.model.training_memory_bytes(spec.train.batch_size, engine=spec.engine)
    return {"preset": name, "engine": spec.engine, "params": spec.model.n_params,
            "batch_size": spec.train.batch_size, "before_mib": before / 2**20,
            "train_mib": used / 2**20, "estimate_mib": estimate / 2**20,
            "error": (estimate - used) / used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared data folder")
    parser.add_argument("--presets", nargs="+", default=["nano", "micro", "tiny", "mini", "small"])
    parser.add_argument("--tokens", type=int, default=60000)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.tokens)))
        return
    rows = []
    for name in args.presets:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--data", args.data,
                              "--tokens", str(args.tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: {name}: {out.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:>6} {r['engine']:>5} {r['params'] / 1e6:5.2f}M  "
              f"trained {r['train_mib']:6.0f} MiB  estimate {r['estimate_mib']:6.0f} MiB  "
              f"{r['error']:+.0%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
