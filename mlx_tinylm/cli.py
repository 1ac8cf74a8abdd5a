"""The `tinylm` command: a thin Typer layer over the library.

Commands parse flags, call one library function and present its result. User-facing failures are
`TinyLMError`s, printed by `main()` as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .config import ModelConfig
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
    preset: str = typer.Option(None, help="Model size preset (see tinylm presets)."),
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
    from .config import DEFAULT_PRESET, DEFAULT_RECIPE, TrainConfig
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
        spec = training.build_spec(prepared, preset=preset or DEFAULT_PRESET, overrides=overrides,
                                   optim=optim, train_cfg=train_cfg, out=out, force=force)
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
                                             help="Penalise tokens of the last 64 (1: off)."),
    seed: int = typer.Option(None, help="Seed for reproducible samples (default: a fresh one, "
                             "reported on stderr)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples per prompt."),
    no_stop: bool = typer.Option(False, "--no-stop", help="Keep going past end-of-document."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample instead of "
                                 "streamed text."),
) -> None:
    """Stream samples from a trained model, token by token."""
    from . import generate as gen
    from .sampling import SamplerConfig

    sampler = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty)
    gen.check_max_tokens(max_tokens)
    if num_samples <= 0:
        fail(f"--num-samples must be a positive integer, got {num_samples}")
    model, tokenizer = gen.load(run_dir)
    prompts = [prompt] if prompt is not None else (line.rstrip("\r\n") for line in sys.stdin)
    first = True
    for text in prompts:
        for k in range(num_samples):
            stats = gen.GenerationStats()
            pieces = gen.generate(model, tokenizer, text, max_tokens, sampler,
                                  None if seed is None else seed + k, not no_stop, stats=stats)
            if as_json:
                out = "".join(pieces)
                typer.echo(json.dumps({"prompt": text, "text": out, **stats.to_dict()}))
                continue
            if not first:
                sys.stdout.write("\n")
            first = False
            sys.stdout.write(text)
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            typer.echo(stats.summary(), err=True)


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


def main() -> None:
    """Console-script entry point: user errors become one line and a non-zero exit."""
    try:
        app(args=_expand_multi_value_flags(sys.argv[1:]), standalone_mode=False)
    except TinyLMError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        # Usage errors (bad flags) come from the click copy Typer ships; match them by shape.
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            message = err.format_message()
            if message:  # an empty message means help was already shown
                typer.echo(f"error: {message}", err=True)
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
