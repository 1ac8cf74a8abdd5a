"""The `tinylm` command: a thin Typer layer over the library.

Commands parse flags, call one library function and present its result. User-facing failures are
`TinyLMError`s, printed by `main()` as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .config import ModelConfig, TrainConfig
from .errors import TinyLMError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train the strongest tiny GPT your laptop can make in N minutes.")


@app.callback()
def _root() -> None:
    """Train the strongest tiny GPT your laptop can make in N minutes."""


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
         probe_seconds: float = typer.Option(1.0, help="Length of the matmul probe.")) -> None:
    """Platform, MLX device, BLAS library, a matmul probe in GFLOP/s, and memory."""
    from . import device

    facts = device.info_dict(probe_seconds)
    if as_json:
        typer.echo(json.dumps(facts))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        if isinstance(value, list):
            value = "\n".join(value) or "-"
        table.add_row(f"[bold]{key.replace('_', ' ')}[/bold]", str(value))
    Console().print(table)


@app.command()
def presets(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """The named model sizes: shape, parameters, FLOPs per token, training memory."""
    from .config import DEFAULT_PRESET, PRESETS, format_count, preset_summary

    rows = {name: preset_summary(name) for name in PRESETS}
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"presets (default: {DEFAULT_PRESET})", title_justify="left")
    for col in ("name", "d_model", "layers", "heads", "context", "params", "FLOPs/token",
                "memory (batch 32)"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for name, r in rows.items():
        table.add_row(name, str(r["d_model"]), str(r["n_layers"]), str(r["n_heads"]),
                      str(r["context_length"]), format_count(r["params"]),
                      format_count(r["flops_per_token"]), f"{r['memory_bytes'] / 2**20:,.0f} MiB")
    Console().print(table)


# ----- plan and sweep -------------------------------------------------------------------------

@app.command()
def plan(
    minutes: float = typer.Option(5.0, help="Training budget to plan for."),
    params: str = typer.Option(None, help="Check one size instead, e.g. 10M (with --tokens)."),
    tokens: str = typer.Option(None, help="Training tokens for --params, e.g. 200M."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size",
                                   help="Batch for --params."),
    engine: str = typer.Option("auto", help="auto, mlx or numpy."),
    seconds: float = typer.Option(1.0, help="Measuring time per candidate shape."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The strongest model for N minutes here: measured throughput + memory + a fitted loss law."""
    from . import plan as planner

    if params is not None or tokens is not None:
        if params is None or tokens is None:
            fail("--params and --tokens go together, e.g. --params 10M --tokens 200M")
        result = planner.check_size(planner.parse_count(params), planner.parse_count(tokens),
                                    batch_size, engine, seconds=seconds)
        typer.echo(json.dumps(result) if as_json else "\n".join(planner.describe_check(result)))
        return
    from rich.console import Console

    console = Console(stderr=True)

    def progress(i: int, n: int, cfg: object) -> None:
        if not as_json:  # one line rewritten in place on a terminal; a line each elsewhere
            console.print(f"measuring {i + 1}/{n}: d_model {cfg.d_model}, "  # type: ignore
                          f"{cfg.n_layers} layers", end="\r" if console.is_terminal else "\n")

    planner.check_budget(minutes)  # before minutes of measuring
    law = planner.LossLaw.load()
    measured = planner.measure_grid(engine, seconds_per_shape=seconds, progress=progress)
    planner.save_measurements(measured, engine)  # `train --preset auto` reuses them
    result = planner.make_plan(minutes, engine, law=law, measured=measured)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_plan(result)


def _print_plan(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .config import format_count

    table = Table(title=f"plan for {result['minutes']:g} minutes on {result['device']} "
                  f"({result['engine']} engine)", title_justify="left")
    for col in ("shape", "params", "tok/s", "tokens", "tok/param", "memory", "pred. bpb"):
        table.add_column(col, justify="left" if col == "shape" else "right")
    for r in result["candidates"]:
        mark = "bold green" if r == result["pick"] else ("dim" if not r["fits"] else None)
        table.add_row(f"d{r['d_model']} L{r['n_layers']} H{r['n_heads']} T{r['context']} "
                      f"B{r['batch_size']}", format_count(r["params"]), f"{r['tok_s']:,.0f}",
                      format_count(r["tokens"]), f"{r['tokens_per_param']:.1f}",
                      f"{r['memory_bytes'] / 2**20:,.0f} MiB" + ("" if r["fits"] else " ✗"),
                      f"{r['predicted_bpb']:.3f}", style=mark)
    console = Console(width=None if sys.stdout.isatty() else 120)  # keep rows whole in a pipe
    console.print(table)
    console.print(f"pick: [bold]{result['command']}[/bold]", soft_wrap=True)


@app.command()
def sweep(
    minutes: float = typer.Option(None, help="Budget per size in minutes (default 2)."),
    tokens: int = typer.Option(None, help="Budget per size in tokens instead."),
    presets: str = typer.Option("nano,micro,tiny,mini,small", help="Comma-separated presets."),
    data: str = typer.Option(None, help="A prepared data folder."),
    files: list[str] = typer.Option(None, help="Local text files."),
    val_files: list[str] = typer.Option(None, help="Validation files for --files."),
    out: str = typer.Option(None, help="Sweep folder (default models/sweep-<timestamp>)."),
    engine: str = typer.Option("auto", help="auto, mlx or numpy."),
    fit: bool = typer.Option(False, help="Refit the planner's loss-law constants from this sweep."),
    fit_with: list[str] = typer.Option(None, "--fit-with", help="Earlier sweep folders whose "
                                       "runs join the fit (another budget separates the effects "
                                       "of size and tokens)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Train several sizes at the same budget, one after another; table + plot (+ refit)."""
    from datetime import datetime
    from pathlib import Path

    from . import plan as planner
    from . import train as training

    if minutes is not None and tokens is not None:
        fail("give only one of --minutes and --tokens")
    if minutes is None and tokens is None:
        minutes = 2.0
    names = [p.strip() for p in presets.split(",") if p.strip()]
    if not names:
        fail("--presets needs at least one preset name")
    if fit_with and not fit:
        fail("--fit-with only adds runs to a fit: give --fit too")
    earlier = [Path(f) for f in fit_with or []]
    for f in earlier:  # a bad folder fails before minutes of training, not after
        planner.read_sweep(f)
    prepared = training.load_data(data, files, val_files, progress=not as_json)
    folder = Path(out or f"models/sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    result = planner.run_sweep(minutes, names, prepared, folder, fit=fit, tokens=tokens,
                               engine=engine, fit_with=earlier)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for r in result["rows"]:
        typer.echo(f"{r['preset']:>8}  {r['params']:>10,} params  {r['tokens']:>11,} tokens  "
                   f"{r['tokens_per_param']:6.1f} tok/param  {r['tok_s']:8,.0f} tok/s  "
                   f"bpb {r['val_bpb']:.4f}")
    typer.echo(f"best: {result['best']['preset']} · table and plot in {folder}")


# ----- train -------------------------------------------------------------------------------------

@app.command()
def train(
    minutes: float = typer.Option(None, help="Wall-clock budget in minutes (default 5)."),
    steps: int = typer.Option(None, help="Train for this many steps instead of a time budget."),
    tokens: int = typer.Option(None, help="Train on this many tokens instead of a time budget."),
    data: str = typer.Option(None, help="A prepared data folder (tinylm data prepare)."),
    files: list[str] = typer.Option(None, help="Local text files to train on (.txt/.jsonl/.json/"
                                    ".parquet)."),
    val_files: list[str] = typer.Option(None, help="Validation files for --files."),
    dataset: str = typer.Option(None, help="Hub dataset (default roneneldan/TinyStories)."),
    preset: str = typer.Option("auto", help="Model size preset (tinylm presets), or auto: "
                               "the planner's pick for this machine and budget."),
    d_model: int = typer.Option(None, "--d-model", help="Override the preset's width."),
    layers: int = typer.Option(None, help="Override the preset's depth."),
    heads: int = typer.Option(None, help="Override the preset's attention heads."),
    context: int = typer.Option(None, help="Override the preset's context length."),
    mlp: str = typer.Option(None, help="MLP kind: swiglu, relu2 or gelu."),
    recipe: str = typer.Option(None, help="Training recipe: default, or nanogpt (the baseline "
                               "of benchmarks/recipe.py); flags above override it."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    out: str = typer.Option(None, help="Run folder (default models/<timestamp>-<preset>)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint."),
    seed: int = typer.Option(0, help="Seed for initialisation and batches."),
    engine: str = typer.Option("auto", help="auto, mlx or numpy."),
    checkpoint_every: float = typer.Option(None, help="Minutes between checkpoints."),
    eval_every: float = typer.Option(None, help="Fraction of the budget between validations."),
    force: bool = typer.Option(False, help="Train even if it may not fit in memory."),
    dashboard: bool = typer.Option(True, help="Live dashboard on a terminal."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
) -> None:
    """Train a model for a wall-clock budget (default 5 minutes), then evaluate and sample."""
    from dataclasses import replace

    from . import train as training
    from .config import DEFAULT_RECIPE
    from .config import recipe as get_recipe
    from .dashboard import make_reporter

    budgets = [b for b in (minutes, steps, tokens) if b is not None]
    if len(budgets) > 1:
        fail("give only one of --minutes, --steps and --tokens")
    train_cfg = TrainConfig(minutes=minutes if minutes is not None else 5.0, steps=steps,
                            tokens=tokens, seed=seed, engine=engine)
    # The recipe first (architecture, optimizer, schedule), then the flags given.
    chosen = get_recipe(recipe or DEFAULT_RECIPE)
    train_cfg = replace(train_cfg, **chosen.train)
    changes = {"batch_size": batch_size, "checkpoint_every_minutes": checkpoint_every,
               "eval_every": eval_every}
    train_cfg = replace(train_cfg, **{k: v for k, v in changes.items() if v is not None})
    optim = chosen.optim if lr is None else replace(chosen.optim, lr=lr)
    reporter = make_reporter(dashboard, as_json)
    if resume:
        spec, prepared = training.resume_spec(out)
    else:
        prepared = training.load_data(data, files, val_files, dataset, progress=not as_json)
        overrides = {**chosen.model, **{k: v for k, v in {
            "d_model": d_model, "n_layers": layers, "n_heads": heads,
            "context_length": context, "mlp": mlp}.items() if v is not None}}
        spec = training.build_spec(prepared, preset=preset, overrides=overrides, optim=optim,
                                   train_cfg=train_cfg, out=out, force=force,
                                   reporter_message=reporter.message)
    try:
        training.train(spec, prepared, reporter)
    finally:
        reporter.close()

# ----- tinylm data ----------------------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Prepare text: tokenizer and token arrays.")
app.add_typer(data_app, name="data")
# `--files a.txt b.txt` reads as `--files a.txt --files b.txt` (see `_expand_multi_value_flags`).
MULTI_VALUE_FLAGS = ("--files", "--val-files")


@data_app.command("prepare")
def data_prepare(
    dataset: str | None = typer.Option(
        None, help="Hugging Face dataset to stream (default roneneldan/TinyStories)."),
    files: list[Path] | None = typer.Option(
        None, "--files", help="Local .txt/.jsonl/.json/.parquet files instead of the hub."),
    val_files: list[Path] | None = typer.Option(
        None, "--val-files", help="Validation files (default: hold out --val-fraction)."),
    text_column: str = typer.Option("text", help="Text field of .json/.jsonl/.parquet/hub rows."),
    vocab_size: int | None = typer.Option(
        None, help=f"Tokenizer vocabulary size (default {ModelConfig.vocab_size})."),
    val_fraction: float = typer.Option(0.02, help="Share of documents held out for validation."),
    max_tokens: int | None = typer.Option(
        None, help="Cap on training tokens (hub default: 3x a fast 5-minute run; files: all)."),
    max_bytes: int | None = typer.Option(
        None, help="Cap on training text bytes read."),
    out: Path | None = typer.Option(
        None, help="Output folder (default: a folder in the cache, see README)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a matching cache exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Train the tokenizer and write token arrays (cached: a second run is instant)."""
    from . import data

    prepared = data.prepare(files=files, val_files=val_files, dataset=dataset,
                            text_column=text_column,
                            vocab_size=vocab_size or data.DEFAULT_VOCAB_SIZE,
                            val_fraction=val_fraction, max_tokens=max_tokens,
                            max_bytes=max_bytes, out=out, force=force, progress=not as_json)
    summary = prepared.summary()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from rich.console import Console

    tr, va = summary["train"], summary["val"]
    when = "cache hit" if summary["cache_hit"] else f"{summary['seconds']:.1f} s"
    Console().print(
        f"[bold]{summary['source']}[/bold]\n"
        f"train: {tr['documents']:,} documents, {tr['tokens']:,} tokens, {tr['bytes']:,} bytes "
        f"({tr['bytes_per_token']} bytes/token){' capped' if tr['capped'] else ''}\n"
        f"val:   {va['documents']:,} documents, {va['tokens']:,} tokens, {va['bytes']:,} bytes "
        f"({va['bytes_per_token']} bytes/token)\n"
        f"vocabulary {summary['vocab_size']:,} ({summary['dtype']}), {when}\n"
        f"{summary['path']}", highlight=False)


def _expand_multi_value_flags(argv: list[str]) -> list[str]:
    """Let MULTI_VALUE_FLAGS take several values: `--files a b` -> `--files a --files b`."""
    out: list[str] = []
    flag = None
    for arg in argv:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            flag = name if name in MULTI_VALUE_FLAGS else None
            out.append(arg)
        elif flag is not None and out[-1] != flag:  # a further value: repeat the flag
            out += [flag, arg]
        else:
            out.append(arg)
    return out


# ----- sample and eval ---------------------------------------------------------------------------

def _sampling_defaults():  # the one place for them is sampling.SamplerConfig (no MLX import)
    from .sampling import SamplerConfig

    return SamplerConfig()


@app.command()
def sample(
    run_dir: str = typer.Argument(..., help="A run folder (models/<run>)."),
    prompt: str = typer.Option(None, help="Text to continue; without it, prompts are read from "
                               "stdin, one per line. An empty prompt starts a new story."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="New tokens per sample at most."),
    temperature: float = typer.Option(_sampling_defaults().temperature,
                                      help="0 is greedy; lower is safer, higher more varied."),
    top_k: int = typer.Option(_sampling_defaults().top_k, "--top-k", help="Keep the k most "
                              "likely tokens (0: off)."),
    top_p: float = typer.Option(_sampling_defaults().top_p, "--top-p", help="Keep the smallest "
                                "set of tokens with this much probability (1: off)."),
    min_p: float = typer.Option(_sampling_defaults().min_p, "--min-p", help="Drop tokens less "
                                "likely than this times the most likely one (0: off)."),
    repetition_penalty: float = typer.Option(_sampling_defaults().repetition_penalty,
                                             "--repetition-penalty",
                                             help="Penalise tokens of the last "
                                             f"{_sampling_defaults().repetition_window} "
                                             "(1: off)."),
    seed: int = typer.Option(None, help="Seed for reproducible samples (default: a fresh one, "
                             "reported on stderr)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples per prompt."),
    no_stop: bool = typer.Option(False, "--no-stop", help="Keep going past end-of-document."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample instead of "
                                 "streamed text."),
) -> None:
    """Stream samples from a trained model, token by token."""
    from .sampling import SamplerConfig, check_max_tokens

    # Bad flags fail before MLX is even imported.
    sampler = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty)
    check_max_tokens(max_tokens)
    if num_samples <= 0:
        fail(f"--num-samples must be a positive integer, got {num_samples}")
    from . import generate as gen

    model, tokenizer = gen.load(run_dir)
    if prompt is None and sys.stdin.isatty():
        typer.echo("reading prompts from stdin, one per line (Ctrl-D to end)", err=True)
    prompts = [prompt] if prompt is not None else (line.rstrip("\r\n") for line in sys.stdin)
    try:
        for i, text in enumerate(prompts):
            for k in range(num_samples):
                stats = gen.GenerationStats()
                pieces = gen.generate(model, tokenizer, text, max_tokens, sampler,
                                      None if seed is None else seed + k, not no_stop,
                                      stats=stats)
                if as_json:
                    out = "".join(pieces)
                    typer.echo(json.dumps({"prompt": text, "text": out, **stats.to_dict()}))
                    continue
                if i or k:
                    sys.stdout.write("\n")
                sys.stdout.write(text)
                sys.stdout.flush()
                for piece in pieces:
                    # With --no-stop a new story follows end-of-document (which decodes to "").
                    sys.stdout.write("\n\n" if piece.token == tokenizer.eos_id else piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                sys.stdout.flush()
                typer.echo(stats.summary(), err=True)
    except BrokenPipeError:  # `tinylm sample ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="A run folder (models/<run>)."),
    data: str = typer.Option(None, help="A prepared data folder: evaluate its validation split."),
    files: list[str] = typer.Option(None, help="Text files to evaluate (.txt: documents split at "
                                    "<|endoftext|> lines, else one running text)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Exact loss, perplexity and bits per byte over every token of held-out text.

    Without --data or --files: the validation split of the data the run was trained on.
    """
    from .generate import evaluate_run

    metrics = evaluate_run(run_dir, data, files, batch_size)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(f"loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.3f}  bpb {metrics['bpb']:.4f}  "
               f"({metrics['tokens']:,} tokens, {metrics['bytes']:,} bytes)")
# ----- bench (issue 6) ---------------------------------------------------------------------------

@app.command()
def bench(
    preset_name: str = typer.Option("tiny", "--preset", help="Model preset to benchmark."),
    engines: str = typer.Option("mlx,torch,numpy", help="Comma-separated: mlx, torch, numpy, "
                                "or single engines (mlx-compiled, torch-eager, ...)."),
    batch_size: int = typer.Option(32, help="Sequences per step."),
    context: int = typer.Option(None, help="Tokens per sequence (default: the preset's)."),
    seconds: float = typer.Option(10.0, help="Training seconds per engine (split in rounds)."),
    mlp: str = typer.Option(None, help="Override the preset's MLP kind: swiglu or relu2."),
    as_json: bool = typer.Option(False, "--json", help="Print the full JSON result."),
    out: str = typer.Option(None, help="Where to save the JSON (default: "
                            "benchmarks/results/bench-<date>-<machine>.json)."),
) -> None:
    """MLX against PyTorch and the NumPy engine on the same model, side by side in one run."""
    from . import bench as B

    progress = None if as_json else (lambda msg: typer.echo(f"  {msg}", err=True))
    result = B.run_bench(preset_name, engines, batch_size, context, seconds, mlp=mlp,
                         progress=progress)
    path = B.save_result(result, out)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        header, rows = B.table_rows(result)
        table = Table(title="tinylm bench: the same model, weights and batch in every engine")
        for h in header:
            table.add_column(h, justify="left" if h == "engine" else "right")
        for r in rows:
            table.add_row(*r)
        console = Console(width=None if sys.stdout.isatty() else 130)
        console.print(table)
        console.print(B.summary_line(result))
        console.print(f"saved {path}")
    if not result["agreement"]["passed"]:
        raise B.BenchError(f"engines disagree: first-step losses differ by "
                           f"{result['agreement']['max_abs_diff']:.2e} (> "
                           f"{result['agreement']['tolerance']:g}); results saved in {path}")


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM is handled like Ctrl-C (training installs its own handler)


def main() -> None:
    """Console-script entry point: user errors become one line and a non-zero exit."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        # Outside standalone mode Typer returns the code of a `typer.Exit` (and turns Ctrl-C
        # into Exit(130)) instead of exiting with it.
        code = app(args=_expand_multi_value_flags(sys.argv[1:]), standalone_mode=False)
        if isinstance(code, int) and code != 0:
            if code == 130:
                typer.echo("error: interrupted", err=True)
            sys.exit(code)
    except TinyLMError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory; choose a smaller model or --batch-size", err=True)
        sys.exit(1)
    except Exception as err:
        # Usage errors (bad flags) come from the click copy Typer ships; match them by shape.
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            message = err.format_message()
            if message:  # an empty message means help was already shown
                typer.echo(f"error: {message}", err=True)
            sys.exit(err.exit_code)
        if os.environ.get("TINYLM_DEBUG"):
            raise
        # Anything else is a bug; still one line, with the way to see the traceback.
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        typer.echo(f"error: unexpected {type(err).__name__}: {first} (a bug in mlx-tinylm; "
                   "run again with TINYLM_DEBUG=1 for the traceback and report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
