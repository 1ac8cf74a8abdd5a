"""How often a trained run loops under different sampler settings (the evidence for the defaults).

    python benchmarks/sampling_loops.py RUN_DIR [--samples 8] [--max-tokens 200] [--out FILE]

For each setting it draws `--samples` continuations of "Once upon a time" (seeds 0..n-1, stopping
at end-of-document) and reports, averaged over samples:
- repeated_4grams: the fraction of token 4-grams that already occurred earlier in the sample;
- looping: the fraction of samples in which some 8-gram occurs three or more times;
- ended: the fraction of samples that reached end-of-document within the token budget;
- tokens: the mean number of generated tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_tinylm  # noqa: E402, F401, I001  (loads OpenBLAS before mlx.core)

from mlx_tinylm.generate import generate, load  # noqa: E402
from mlx_tinylm.sampling import SamplerConfig  # noqa: E402

SETTINGS = {
    "greedy": SamplerConfig(temperature=0, repetition_penalty=1.0),
    "pure (T=1, nothing else)": SamplerConfig(temperature=1.0, top_p=1.0, min_p=0.0,
                                              repetition_penalty=1.0),
    "T=0.8 only": SamplerConfig(temperature=0.8, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    "defaults without penalty": SamplerConfig(repetition_penalty=1.0),
    "defaults": SamplerConfig(),
    "defaults, penalty 1.3": SamplerConfig(repetition_penalty=1.3),
    "greedy + penalty 1.15": SamplerConfig(temperature=0),
}


def repeated_fraction(ids: list[int], n: int) -> float:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def loops(ids: list[int], n: int = 8, times: int = 3) -> bool:
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--out", help="also write the result JSON here")
    args = parser.parse_args()

    model, tokenizer = load(args.run_dir)
    rows = []
    for name, sampler in SETTINGS.items():
        stats = {"repeated_4grams": 0.0, "looping": 0.0, "ended": 0.0, "tokens": 0.0}
        for seed in range(args.samples):
            ids = [p.token for p in generate(model, tokenizer, args.prompt, args.max_tokens,
                                             sampler, seed=seed) if p.token is not None]
            ended = ids[-1] == tokenizer.eos_id
            body = ids[:-1] if ended else ids
            stats["repeated_4grams"] += repeated_fraction(body, 4) / args.samples
            stats["looping"] += loops(body) / args.samples
            stats["ended"] += ended / args.samples
            stats["tokens"] += len(ids) / args.samples
        rows.append({"setting": name, **{k: round(v, 3) for k, v in stats.items()},
                     "sampler": asdict(sampler)})
        print(f"{name:28s} repeated 4-grams {stats['repeated_4grams']:.3f}  looping "
              f"{stats['looping']:.2f}  ended {stats['ended']:.2f}  tokens {stats['tokens']:.0f}",
              file=sys.stderr)
    result = {"benchmark": "sampling_loops", "date": date.today().isoformat(),
              "run": str(args.run_dir), "prompt": args.prompt, "samples": args.samples,
              "max_tokens": args.max_tokens, "settings": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
