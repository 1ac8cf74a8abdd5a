"""Which vocabulary size learns most in a fixed wall-clock budget? Validation bpb per size.

    python benchmarks/vocab.py --minutes 2 --vocab-sizes 1024 2048 4096 8192 --preset tiny

For each vocabulary size: prepare TinyStories (train.txt + train_more.txt, validation valid.txt)
with that vocabulary, build the preset with it, and train for the same wall-clock budget. The models
take turns step by step, so a busy machine slows them all alike; each stops when its own summed
step time (compile included) reaches the budget. Learning rate: linear warm-up over 20 steps, then
cosine to 10% keyed to elapsed time / budget. Then each is scored by bits per UTF-8 byte on the same
validation documents (bpb is comparable across tokenizers; loss per token is not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import mlx_tinylm  # noqa: F401  (loads OpenBLAS; must come before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_tinylm.config import OptimConfig, preset
from mlx_tinylm.data import BatchSampler, eval_batches, prepare
from mlx_tinylm.model import GPT, make_optimizer, make_train_step

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinystories"
WARMUP_STEPS = 20


class Run:
    def __init__(self, vocab: int, args: argparse.Namespace):
        files = [DATA / f for f in args.files]
        self.data = prepare(files=files, val_files=[DATA / "valid.txt"], vocab_size=vocab,
                            progress=False)
        self.cfg = preset(args.preset).with_(vocab_size=vocab, context_length=args.context)
        self.model = GPT(self.cfg)
        self.model.init_weights(seed=args.seed)
        self.opt_cfg = OptimConfig()
        self.optimizer = make_optimizer(self.opt_cfg)
        self.step_fn = make_train_step(self.model, self.optimizer, self.opt_cfg.grad_clip)
        self.sampler = BatchSampler(self.data.tokens("train"), args.batch_size, args.context,
                                    seed=args.seed)
        self.budget = args.minutes * 60
        self.elapsed = 0.0
        self.steps = 0
        self.loss = float("nan")

    def lr(self) -> float:
        warm = min(1.0, (self.steps + 1) / WARMUP_STEPS)
        frac = min(1.0, self.elapsed / self.budget)
        return self.opt_cfg.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    def step(self) -> None:
        x, y = self.sampler.next()
        start = time.perf_counter()
        self.optimizer.learning_rate = mx.array(self.lr())
        loss, norm = self.step_fn(mx.array(x), mx.array(y))
        mx.eval(loss, norm, self.model.state, self.optimizer.state)
        self.elapsed += time.perf_counter() - start
        self.steps += 1
        self.loss = loss.item()

    def bpb(self, documents: int, batch_size: int, context: int) -> tuple[float, int]:
        """Bits per byte on the first `documents` validation documents (the same text for all)."""
        tokens = np.asarray(self.data.tokens("val"))
        ends = np.flatnonzero(tokens == self.data.tokenizer.eos_id)
        tokens = tokens[: ends[min(documents, len(ends) - 1)] + 1]
        counts = self.data.tokenizer.token_bytes()
        nats, n_bytes = 0.0, 0
        for x, y, mask in eval_batches(tokens, context, batch_size):
            logits = self.model(mx.array(x))
            loss = nn.losses.cross_entropy(logits, mx.array(y), reduction="none")
            nats += float(mx.sum(loss * mx.array(mask)).item())
            n_bytes += int(counts[y[mask]].sum())
        return nats / (math.log(2) * n_bytes), n_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--vocab-sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--files", nargs="+", default=["train.txt", "train_more.txt"])
    parser.add_argument("--eval-documents", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    runs = [Run(v, args) for v in args.vocab_sizes]
    wall = time.perf_counter()
    while any(r.elapsed < r.budget for r in runs):
        for r in runs:
            if r.elapsed < r.budget:
                r.step()
    print(f"trained {len(runs)} models in {time.perf_counter() - wall:.0f} s of wall-clock")
    rows = []
    for r in runs:
        bpb, n_bytes = r.bpb(args.eval_documents, args.batch_size, args.context)
        tokens = r.steps * args.batch_size * args.context
        row = {"vocab_size": r.cfg.vocab_size, "params": r.cfg.n_params,
               "bytes_per_token": round(r.data.n_bytes("train") / r.data.n_tokens("train"), 3),
               "steps": r.steps, "train_tokens": tokens,
               "train_bytes": round(tokens * r.data.n_bytes("train") / r.data.n_tokens("train")),
               "tok_per_s": round(tokens / r.elapsed), "last_train_loss": round(r.loss, 4),
               "val_bpb": round(bpb, 4), "val_bytes": n_bytes}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "vocab", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
