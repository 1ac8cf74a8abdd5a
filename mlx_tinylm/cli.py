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
