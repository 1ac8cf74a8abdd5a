"""Throughput benchmark: MLX vs PyTorch vs the NumPy engine on the same model, in one run.

The same as `tinylm bench` (see mlx_tinylm/bench.py for what is measured and how), for running
from a checkout without installing the CLI; it also writes the Markdown table next to the JSON.

    python benchmarks/throughput.py --preset tiny --seconds 30
    python benchmarks/throughput.py --engines mlx,numpy --mlp relu2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_tinylm import bench  # noqa: E402  (after the path set-up above)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--engines", default="mlx,torch,numpy")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--mlp", choices=("swiglu", "relu2"), default=None,
                   help="override the preset's MLP kind")
    p.add_argument("--seconds", type=float, default=10.0, help="training seconds per engine")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default: one per 2 seconds, at least 3)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args()
    result = bench.run_bench(args.preset, args.engines, args.batch_size, args.context,
                             args.seconds, rounds=args.rounds, mlp=args.mlp,
                             progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    path = bench.save_result(result, args.out)
    md = bench.to_markdown(result)
    path.with_suffix(".md").write_text(f"`{result['command']}`\n\n{md}")
    print(md)
    print(f"saved {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
