"""Time `tinylm data prepare` on the shared TinyStories files: cold build, then a cache hit.

    python benchmarks/prepare.py                       # train.txt + valid.txt, default vocabulary
    python benchmarks/prepare.py --vocab-sizes 1024 2048 4096 8192 --json results/x.json

Each cold run builds into a fresh folder and is timed end to end as a user runs it (a `python -m
mlx_tinylm data prepare` subprocess: interpreter start, imports, reading, tokenizer training,
encoding, writing); the cache hit is the same command run again. Goal on a 2-core machine: < 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinystories"


def timed_cli(args: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlx_tinylm", "data", "prepare", *args, "--json"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"prepare failed: {done.stderr.strip()}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", type=Path, default=[DATA / "train.txt"])
    parser.add_argument("--val-files", nargs="+", type=Path, default=[DATA / "valid.txt"])
    parser.add_argument("--vocab-sizes", nargs="+", type=int, default=[None])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab_sizes:
            out = Path(tmp) / f"v{vocab}"
            cli = ["--files", *map(str, args.files), "--val-files", *map(str, args.val_files),
                   "--out", str(out)] + (["--vocab-size", str(vocab)] if vocab else [])
            cold, summary = timed_cli(cli)
            warm, again = timed_cli(cli)
            assert again["cache_hit"] and not summary["cache_hit"]
            text_mb = (summary["train"]["bytes"] + summary["val"]["bytes"]) / 1e6
            row = {"vocab_size": summary["vocab_size"], "cold_s": round(cold, 2),
                   "inside_prepare_s": summary["seconds"], "cache_hit_s": round(warm, 2),
                   "text_MB": round(text_mb, 2), "MB_per_s": round(text_mb / cold, 2),
                   "train_tokens": summary["train"]["tokens"],
                   "val_tokens": summary["val"]["tokens"],
                   "train_bytes_per_token": summary["train"]["bytes_per_token"],
                   "val_bytes_per_token": summary["val"]["bytes_per_token"]}
            rows.append(row)
            print(json.dumps(row))
    result = {"benchmark": "prepare", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
              "files": [str(p) for p in args.files], "val_files": [str(p) for p in args.val_files],
              "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
