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


# ----- bench (issue 6) ---------------------------------------------------------------------------

@app.command()
def bench(
    preset_name: str = typer.Option("tiny", "--preset", help="Model preset to benchmark."),
    engines: str = typer.Option("mlx,torch,numpy", help="Comma-separated: mlx, torch, numpy, "
                                "or single engines (mlx-compiled, torch-eager, ...)."),
    batch_size: int = typer.Option(32, help="Sequences per step."),
    context: int = typer.Option(None, help="Tokens per sequence (default: the preset's)."),
    seconds: float = typer.Option(10.0, help="Training seconds per engine (split in rounds)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full JSON result."),
    out: str = typer.Option(None, help="Where to save the JSON (default: "
                            "benchmarks/results/bench-<date>-<machine>.json)."),
) -> None:
    """MLX against PyTorch and the NumPy engine on the same model, side by side in one run."""
    from . import bench as B

    progress = None if as_json else (lambda msg: typer.echo(f"  {msg}", err=True))
    result = B.run_bench(preset_name, engines, batch_size, context, seconds, progress=progress)
    path = B.save_result(result, out)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        header, rows = B.table_rows(result)
        table = Table(title="tinylm bench: training step and more, same model, same weights")
        for h in header:
            table.add_column(h, justify="left" if h in ("engine", "device") else "right")
        for r in rows:
            table.add_row(*r)
        console = Console()
        console.print(table)
        console.print(B.summary_line(result))
        console.print(f"saved {path}")
    if not result["agreement"]["passed"]:
        raise B.BenchError(f"engines disagree: first-step losses differ by "
                           f"{result['agreement']['max_abs_diff']:.2e} (> "
                           f"{result['agreement']['tolerance']:g}); results saved in {path}")


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
