"""The `tinylm` command: a thin Typer layer over the library.

Commands parse flags, call one library function and present its result. User-facing failures are
`TinyLMError`s, printed by `main()` as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import json
import sys

import typer

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


def main() -> None:
    """Console-script entry point: user errors become one line and a non-zero exit."""
    try:
        app(standalone_mode=False)
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
