"""Generation speed: KV cache vs recomputation, and prompt prefill.

    python benchmarks/generation.py [--preset tiny] [--new-tokens 256] [--repeats 3] [--out FILE]

For the preset's model (random weights: speed does not depend on them) it measures
- prefill tok/s: one forward over a full context of prompt tokens;
- generation tok/s for `--new-tokens` new tokens after a 16-token prompt, with the KV cache and by
  recomputing the whole window for every token, both through `generate_tokens` with the default
  sampler, so sampling and the sliding window cost the same in both.
The two generation modes alternate in each repeat so machine load hits both alike; the median of
the repeats is reported, with the ratio. Greedy runs of both modes must produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_tinylm.config import preset  # noqa: E402
from mlx_tinylm.device import device_name  # noqa: E402
from mlx_tinylm.generate import generate_tokens  # noqa: E402
from mlx_tinylm.model import GPT  # noqa: E402
from mlx_tinylm.sampling import SamplerConfig  # noqa: E402


def generation_tok_s(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool) -> float:
    start = time.perf_counter()
    out = list(generate_tokens(model, prompt, new_tokens, SamplerConfig(), seed=0,
                               stop_at_eos=False, use_cache=use_cache))
    return len(out) / (time.perf_counter() - start)


def prefill_tok_s(model: GPT, tokens: list[int], repeats: int) -> float:
    x = mx.array([tokens])
    mx.eval(model(x))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(model(x)[0, -1])
        times.append(time.perf_counter() - start)
    return len(tokens) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the result JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    cfg = preset(args.preset)
    model = GPT(cfg)
    model.init_weights(seed=0)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_tokens).tolist()
    full = rng.integers(0, cfg.vocab_size, cfg.context_length).tolist()

    greedy = SamplerConfig(temperature=0)
    same = [list(generate_tokens(model, prompt, 64, greedy, stop_at_eos=False, use_cache=c))
            for c in (True, False)]

    generation_tok_s(model, prompt, 8, True)  # warm-up both paths
    generation_tok_s(model, prompt, 8, False)
    cached, recompute = [], []
    for _ in range(args.repeats):
        cached.append(generation_tok_s(model, prompt, args.new_tokens, True))
        recompute.append(generation_tok_s(model, prompt, args.new_tokens, False))
    result = {
        "benchmark": "generation",
        "date": date.today().isoformat(),
        "preset": args.preset,
        "model": {k: cfg.to_dict()[k] for k in ("d_model", "n_layers", "n_heads",
                                                  "context_length", "vocab_size", "mlp")},
        "params": cfg.n_params,
        "device": device_name(),
        "mlx": mx.__version__,
        "platform": platform.platform(),
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "prefill_tok_s": round(prefill_tok_s(model, full, max(args.repeats, 5)), 1),
        "cached_tok_s": round(statistics.median(cached), 1),
        "recompute_tok_s": round(statistics.median(recompute), 1),
        "cached_runs": [round(v, 1) for v in cached],
        "recompute_runs": [round(v, 1) for v in recompute],
        "greedy_outputs_equal": same[0] == same[1],
        # Timings on a shared machine depend on what else runs; the ratio is the robust number.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
    }
    result["speedup"] = round(result["cached_tok_s"] / result["recompute_tok_s"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
