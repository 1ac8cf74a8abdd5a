"""Compare training recipes: named variants × seeds at one budget, scored by exact validation bpb.

    python benchmarks/recipe.py --variants nanogpt default --seeds 0 1 --tokens 2000000
    python benchmarks/recipe.py --variants nanogpt default --seeds 0 1 --minutes 5
    python benchmarks/recipe.py --plan screen --tokens 300000 --set context_length=128 batch_size=16

A variant is a recipe of `mlx_tinylm.config.RECIPES` ("default", "nanogpt") optionally followed by
`:key=value,key=value` overrides, e.g. `default:mlp=relu2,lr=4e-3` or `nanogpt:tokens=1000000`.
A key is a ModelConfig field (architecture or size: `mlp`, `d_model`, `n_layers`, ...), an
OptimConfig field (`lr`, `optimizer`, `muon_lr`, ...), a TrainConfig field (`batch_size`,
`schedule`, `decay`, `tokens`, ...), `preset` (the size preset, default "tiny") or `vocab_size`
(the data is prepared with that tokenizer; compare such variants in bpb, never in loss).
`--set` applies overrides to every variant first.

Every run goes through the real training loop (`mlx_tinylm.train.train`) on the
same prepared TinyStories data (../shared/data/tinystories: train.txt + train_more.txt for
training, valid.txt for validation) and ends with the exact evaluation over the whole validation
split. `--engine auto` (the default) trains each variant on the engine `tinylm train` would pick
for it, which is what a user gets and what a wall-clock budget must measure; `--engine mlx` puts
every variant on MLX. Engines differ only in rounding and in how a seed draws the initial weights.
Results are written after every run to benchmarks/results/recipe-<date>-<machine>.json
(`--json` elsewhere); `--resume` skips the runs that file already holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinystories"
sys.path.insert(0, str(ROOT))

import mlx_tinylm  # noqa: E402,F401  (sets up BLAS before MLX is imported)
from mlx_tinylm import train as training  # noqa: E402
from mlx_tinylm.config import (  # noqa: E402
    DEFAULT_PRESET,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    recipe,
)
from mlx_tinylm.dashboard import PlainLog  # noqa: E402
from mlx_tinylm.errors import TinyLMError  # noqa: E402

MODEL_KEYS = {f.name for f in fields(ModelConfig)} - {"vocab_size"}
OPTIM_KEYS = {f.name for f in fields(OptimConfig)}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
INT_KEYS = {"d_model", "n_layers", "n_heads", "context_length", "mlp_hidden", "vocab_size",
            "batch_size", "tokens", "steps", "seed", "eval_batches"}

# Named plans: the variants of one ablation round, each against the first (the current best).
# "screen" is sized for the micro preset (d96 L3, ~0.33M non-embedding parameters) at batch 16 ×
# context 256: its two depth/width variants keep the non-embedding parameters within 5% of it.
PLANS: dict[str, list[str]] = {
    "baseline": ["nanogpt", "default"],
    "screen": [
        "default", "nanogpt",
        "default:mlp=relu2", "default:mlp=gelu",
        "default:position=learned", "default:qk_norm=true", "default:zero_init_residual=true",
        "default:tie_embeddings=false", "default:optimizer=muon",
        "default:lr=1e-3", "default:lr=4e-3", "default:lr=8e-3",
        "default:schedule=cosine,final_lr_frac=0.1", "default:decay=0.2", "default:decay=0.7",
        "default:batch_size=8", "default:batch_size=32",
        "default:context_length=128", "default:context_length=512",
        "default:d_model=64,n_heads=2,n_layers=6", "default:d_model=112,n_heads=4,n_layers=2",
        "default:vocab_size=1024", "default:vocab_size=2048",
    ],
}


# ----- variants ---------------------------------------------------------------------------------

def parse_value(key: str, text: str) -> Any:
    """'true' -> True, '4e-3' -> 0.004, '128' -> 128, 'relu2' -> 'relu2', 'null' -> None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if key in INT_KEYS and isinstance(value, float) and value.is_integer():
        return int(value)  # 2e6 tokens
    if key == "betas" and isinstance(value, list):
        return tuple(value)
    return value


def parse_overrides(text: str) -> dict[str, Any]:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}; every key must be one the variants understand."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TinyLMError(f"override {item!r} is not key=value")
        if key not in MODEL_KEYS | OPTIM_KEYS | TRAIN_KEYS | {"preset", "vocab_size"}:
            raise TinyLMError(f"unknown override {key!r}: use a ModelConfig, OptimConfig or "
                              "TrainConfig field, preset or vocab_size")
        out[key] = parse_value(key, value.strip())
    return out


def resolve_variant(spec: str, common: dict[str, Any], budget: TrainConfig
                    ) -> tuple[str, int, ModelConfig, OptimConfig, TrainConfig]:
    """(size preset, vocab_size, model without vocabulary, optim, train) of a variant spec."""
    name, _, rest = spec.partition(":")
    base = recipe(name.strip())
    changes = {**common, **parse_overrides(rest)}
    preset = changes.pop("preset", DEFAULT_PRESET)
    vocab = int(changes.pop("vocab_size", ModelConfig.vocab_size))
    from mlx_tinylm.config import preset as get_preset

    model, optim, train_cfg = base.apply(get_preset(preset), budget)
    model = model.with_(**{k: v for k, v in changes.items() if k in MODEL_KEYS})
    optim = replace(optim, **{k: v for k, v in changes.items() if k in OPTIM_KEYS})
    train_cfg = replace(train_cfg, **{k: v for k, v in changes.items() if k in TRAIN_KEYS})
    return preset, vocab, model, optim, train_cfg


# ----- data -------------------------------------------------------------------------------------

def load_data(vocab: int, files: list[Path], val_files: list[Path], val_stories: int | None,
              cache: dict[int, Any]) -> Any:
    """Prepared data for this vocabulary (prepared once, then the cache)."""
    if vocab not in cache:
        from mlx_tinylm.data import data_cache_dir, prepare

        if val_stories is not None:  # a fixed prefix of the validation text, for quick screens
            sliced = data_cache_dir() / "recipe-val" / f"{val_files[0].stem}-first{val_stories}.txt"
            if not sliced.exists():
                sliced.parent.mkdir(parents=True, exist_ok=True)
                docs = val_files[0].read_text(encoding="utf-8").split("\n<|endoftext|>\n")
                sliced.write_text("\n<|endoftext|>\n".join(docs[:val_stories])
                                  + "\n<|endoftext|>\n", encoding="utf-8")
            val_files = [sliced]
        cache[vocab] = prepare(files=files, val_files=val_files, vocab_size=vocab,
                               progress=False)
    return cache[vocab]


# ----- runs ---------------------------------------------------------------------------------------

class Quiet(PlainLog):
    """One progress line a minute on stderr; the table is the output."""

    def __init__(self, label: str):
        super().__init__(sys.stderr, every_s=60.0)
        self.label = label

    def start(self, info: dict[str, Any]) -> None:
        self._print(f"[{self.label}] {info['params']:,} params, budget {info['budget']}")

    def step(self, m: dict[str, Any]) -> None:
        if m["elapsed"] - self._last_elapsed >= self.every_s:
            self._last_elapsed = m["elapsed"]
            self._print(f"[{self.label}] step {m['step']} {m['progress']:.0%} loss {m['loss']:.3f}"
                        f" {m['tok_s']:,.0f} tok/s")

    def finish(self, summary: dict[str, Any]) -> None:
        self._print(f"[{self.label}] val bpb {summary['val_bpb']:.4f} after {summary['tokens']:,} "
                    f"tokens, {summary['train_seconds']:.0f} s")


def run_one(spec: str, seed: int, common: dict[str, Any], budget: TrainConfig, args: Any,
            data_cache: dict[int, Any]) -> dict[str, Any]:
    preset, vocab, model, optim, train_cfg = resolve_variant(spec, common, budget)
    train_cfg = replace(train_cfg, seed=seed)
    data = load_data(vocab, args.files, args.val_files, args.val_stories, data_cache)
    with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
        overrides = {f.name: getattr(model, f.name) for f in fields(ModelConfig)
                     if f.name != "vocab_size"}
        run = training.build_spec(data, preset=preset, overrides=overrides, optim=optim,
                                  train_cfg=train_cfg, out=Path(tmp) / "run")
        summary = training.train(run, data, Quiet(f"{spec} seed {seed}"))
        cfg, engine = run.model, run.engine
    return {
        "variant": spec, "seed": seed, "val_bpb": summary["val_bpb"],
        "val_loss": summary["val_loss"], "tokens": summary["tokens"], "steps": summary["steps"],
        "train_seconds": summary["train_seconds"], "tok_s": summary["tok_s"],
        "eval_seconds": summary["eval_seconds"], "params": cfg.n_params,
        "val_tokens": summary["val_tokens"], "engine": engine,
        "model": cfg.to_dict(), "optim": asdict(optim), "train": asdict(run.train),
    }


def summarise(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Per variant: bpb mean, half-range and standard deviation over seeds; tokens and tok/s."""
    rows = []
    reference = None
    for spec in order:
        mine = [r for r in runs if r["variant"] == spec]
        if not mine:
            continue
        bpb = [r["val_bpb"] for r in mine]
        row = {"variant": spec, "seeds": len(mine), "bpb_mean": statistics.fmean(bpb),
               "bpb_half_range": (max(bpb) - min(bpb)) / 2,
               "bpb_std": statistics.stdev(bpb) if len(bpb) > 1 else math.nan,
               "tokens": statistics.fmean(r["tokens"] for r in mine),
               "tok_s": statistics.fmean(r["tok_s"] for r in mine),
               "train_seconds": statistics.fmean(r["train_seconds"] for r in mine),
               "params": mine[0]["params"]}
        if reference is None:
            reference = row["bpb_mean"]
        row["delta_vs_first"] = row["bpb_mean"] - reference
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | seeds | val bpb (mean ± half-range) | Δ vs first | params | tokens | "
             "tok/s | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['seeds']} | {r['bpb_mean']:.4f} ± "
                     f"{r['bpb_half_range']:.4f} | {r['delta_vs_first']:+.4f} | "
                     f"{r['params'] / 1e6:.2f}M | {r['tokens']:,.0f} | {r['tok_s']:,.0f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=[], help="variant specs (see above)")
    parser.add_argument("--plan", choices=sorted(PLANS), help="a named list of variants, run "
                        "after --variants")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=int, help="token budget per run (hardware-independent)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget per run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every variant")
    parser.add_argument("--files", nargs="+", type=Path,
                        default=[DATA / "train.txt", DATA / "train_more.txt"])
    parser.add_argument("--val-files", nargs="+", type=Path, default=[DATA / "valid.txt"])
    parser.add_argument("--val-stories", type=int, help="validate on the first N stories only "
                        "(quick screens; the default is the whole validation file)")
    parser.add_argument("--engine", choices=["auto", "mlx", "numpy"], default="auto",
                        help="training engine for every variant (auto: the one `tinylm train` "
                        "picks for it)")
    parser.add_argument("--json", type=Path, help="results file (default benchmarks/results/"
                        "recipe-<date>-<machine>.json)")
    parser.add_argument("--resume", action="store_true", help="skip runs already in --json")
    parser.add_argument("--report", action="store_true", help="train nothing: print the table "
                        "of the runs --json holds for this budget and --set (all variants when "
                        "none are given)")
    args = parser.parse_args(argv)

    variants = list(dict.fromkeys(args.variants + (PLANS[args.plan] if args.plan else [])))
    if not variants and not args.report:
        parser.error("give --variants and/or --plan")
    common = parse_overrides(",".join(args.set))
    budget = TrainConfig(minutes=args.minutes, tokens=args.tokens, engine=args.engine,
                         eval_every=1.0, sample_tokens=0, log_every_s=5.0,
                         checkpoint_every_minutes=1e6)
    for spec in variants:  # fail on a bad spec before hours of training, not after
        resolve_variant(spec, common, budget)
    out = args.json or (ROOT / "benchmarks" / "results"
                        / f"recipe-{time.strftime('%Y-%m-%d')}-{machine()}.json")
    budget_label = f"{args.tokens} tokens" if args.tokens else f"{args.minutes} minutes"
    common_label = ",".join(args.set)

    def key(r: dict[str, Any]) -> tuple:
        return r["variant"], r["seed"], r["budget"], r.get("set", "")

    # The file accumulates runs of every budget and --set; a run is redone unless --resume.
    old = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in old if r.get("set", "") == common_label and r["budget"] == budget_label]
    others = [r for r in old if r not in runs]
    done = {key(r) for r in runs} if args.resume else set()
    if args.report:
        variants = variants or list(dict.fromkeys(r["variant"] for r in runs))
        print(table(summarise(runs, variants)))
        return
    result = {"benchmark": "recipe", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": " ".join(["python", "benchmarks/recipe.py", *sys.argv[1:]]),
              "load_average_at_start": os.getloadavg()}
    data_cache: dict[int, Any] = {}
    for seed in args.seeds:  # seed-major: a cut-short benchmark still compares every variant
        for spec in variants:
            if (spec, seed, budget_label, common_label) in done:
                continue
            row = run_one(spec, seed, common, budget, args, data_cache)
            row.update(budget=budget_label, set=common_label, load_average=os.getloadavg())
            runs = [r for r in runs if key(r) != key(row)] + [row]
            result["runs"] = others + runs
            result["summary"] = summarise(runs, variants)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    rows = summarise(runs, variants)
    print(f"budget {budget_label}, --set {common_label or '-'}, seeds {args.seeds}, {machine()}\n")
    print(table(rows))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    try:
        main()
    except TinyLMError as err:
        sys.exit(f"error: {err}")
