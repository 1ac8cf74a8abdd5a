"""What a training run shows: a live rich dashboard on a terminal, plain lines elsewhere.

Both are `Reporter`s for train.py. The dashboard only mutates a few fields per report; rich's
refresh thread draws them once a second, so the training loop never waits on drawing.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .config import format_count


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def loss_chart(train: list[tuple[float, float]], val: list[tuple[float, float]],
               width: int = 60, height: int = 10) -> Text:
    """A terminal chart of (x, loss) points: train as dots, validation as circles."""
    points = train + val
    if not points:
        return Text("waiting for the first steps…", style="dim")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y1 = y0 + 1.0
    grid = [[" "] * width for _ in range(height)]

    def put(x: float, y: float, ch: str) -> None:
        col = int((x - x0) / max(x1 - x0, 1e-9) * (width - 1))
        row = int((y1 - y) / (y1 - y0) * (height - 1))
        grid[row][col] = ch

    for x, y in train:
        put(x, y, "·")
    for x, y in val:
        put(x, y, "●")
    text = Text()
    for r, row in enumerate(grid):
        label = f"{y1 - (y1 - y0) * r / (height - 1):6.2f} │" if r % 3 == 0 else "       │"
        text.append(label, style="dim")
        for ch in row:
            text.append(ch, style="bold magenta" if ch == "●" else "cyan")
        text.append("\n")
    text.append("       └" + "─" * width + "\n", style="dim")
    text.append("        · train  ", style="cyan")
    text.append("● validation", style="bold magenta")
    text.append("   (x: budget seconds)", style="dim")
    return text


class Dashboard:
    """A rich Live view of one run."""

    max_points = 400

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.info: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.train_points: list[tuple[float, float]] = []
        self.val_points: list[tuple[float, float]] = []
        self.sample = ""
        self.messages: list[str] = []
        # One redraw a second while training: a redraw costs ~10-20 ms of Python here, so this keeps
        # the dashboard around 1% of the step time on two cores. Samples stream during validation,
        # when the budget clock is paused, so they redraw on every piece.
        self.live = Live(self, console=self.console, refresh_per_second=1, transient=False)

    # Reporter interface
    def start(self, info: dict[str, Any]) -> None:
        self.info = info
        self.live.start()

    def step(self, m: dict[str, Any]) -> None:
        self.last = m
        self.train_points.append((m["elapsed"], m["loss"]))
        if len(self.train_points) > self.max_points:  # keep drawing cost flat on long runs
            self.train_points = self.train_points[::2]

    def evaluation(self, m: dict[str, Any]) -> None:
        self.last_eval = m
        self.val_points.append((m["elapsed"], m["val_loss"]))
        self.sample = ""

    def sample_piece(self, text: str, first: bool) -> None:
        self.sample = text if first else self.sample + text
        self.live.refresh()

    def message(self, text: str) -> None:
        self.messages = (self.messages + [text])[-3:]

    def finish(self, summary: dict[str, Any]) -> None:
        self.live.stop()
        self.console.print(summary_table(summary))

    def close(self) -> None:
        self.live.stop()

    # Drawing
    def __rich__(self) -> Panel:
        info, m = self.info, self.last
        progress = m.get("progress", 0.0)
        elapsed = m.get("elapsed", 0.0)
        remaining = elapsed / progress - elapsed if progress > 0 else 0.0
        bar = Table.grid(expand=True)
        bar.add_column(ratio=1)
        bar.add_column(justify="right")
        bar.add_row(ProgressBar(total=1.0, completed=progress),
                    f" {progress:5.1%}  {_clock(elapsed)} elapsed  {_clock(remaining)} left")

        stats = Table.grid(padding=(0, 2))
        for _ in range(4):
            stats.add_column()
        ev = self.last_eval
        stats.add_row("step", f"{m.get('step', 0):,}", "tokens", format_count(m.get("tokens", 0)))
        stats.add_row("tok/s", f"{m.get('tok_s', 0):,.0f}", "MFU", f"{m.get('mfu', 0):.1%}")
        stats.add_row("lr", f"{m.get('lr', 0):.2e}", "grad norm", f"{m.get('grad_norm', 0):.3f}")
        stats.add_row("train loss", f"{m.get('loss', float('nan')):.4f}",
                      "val loss", f"{ev['val_loss']:.4f}" if ev else "-")
        stats.add_row("val bpb", f"{ev['val_bpb']:.4f}" if ev else "-",
                      "peak mem", _mib(m.get("peak_mem", 0)))
        stats.add_row("batch wait", f"{m.get('wait_s', 0):.2f}s", "", "")

        body = [bar, Text(""), stats, Text(""),
                loss_chart(self.train_points, self.val_points,
                           width=max(20, min(70, self.console.width - 14)))]
        if self.sample:
            sample = Text(self.info.get("prompt", ""), style="dim")
            sample.append(self.sample)
            body += [Text(""), Panel(sample, title="sample", title_align="left")]
        for msg in self.messages:
            body.append(Text(msg, style="yellow"))
        title = (f"[bold]{info.get('run', '')}[/bold] · {info.get('device', '')} · "
                 f"{info.get('engine', '')} · {format_count(info.get('params', 0))} params · "
                 f"{info.get('budget', '')}")
        return Panel(Group(*body), title=title, title_align="left")


class PlainLog:
    """One line per report, for pipes, CI logs and `--no-dashboard`."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0):
        self.stream = stream or sys.stdout
        self.every_s = every_s
        self._last_elapsed = -1e9

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def start(self, info: dict[str, Any]) -> None:
        self._print(f"run {info['run']} · {info['device']} · engine {info['engine']} · "
                    f"{format_count(info['params'])} params · budget {info['budget']} · "
                    f"folder {info['run_dir']}")

    def step(self, m: dict[str, Any]) -> None:
        if m["elapsed"] - self._last_elapsed < self.every_s and m["progress"] < 1.0:
            return
        self._last_elapsed = m["elapsed"]
        self._print(f"step {m['step']:>6} | {m['progress']:6.1%} | loss {m['loss']:.4f} | "
                    f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | {m['tok_s']:,.0f} tok/s | "
                    f"MFU {m['mfu']:.1%} | {_clock(m['elapsed'])}")

    def evaluation(self, m: dict[str, Any]) -> None:
        self._print(f"eval  step {m['step']:>6} | val loss {m['val_loss']:.4f} | "
                    f"ppl {m['val_ppl']:.2f} | bpb {m['val_bpb']:.4f}")

    def sample_piece(self, text: str, first: bool) -> None:
        pass  # plain logs show the final sample only

    def message(self, text: str) -> None:
        self._print(text)

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary_rows(summary):
            self._print(f"{key:>22}: {value}")

    def close(self) -> None:
        pass


class JsonLog(PlainLog):
    """Plain lines to stderr, one JSON summary object on stdout."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def finish(self, summary: dict[str, Any]) -> None:
        print(json.dumps(summary), flush=True)


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("parameters", format_count(s["params"])),
        ("tokens trained", f"{s['tokens']:,} ({s['tokens_per_param']:.1f}/param)"),
        ("training time", f"{s['train_seconds']:.1f} s, {s['steps']:,} steps"),
        ("throughput", f"{s['tok_s']:,.0f} tok/s, MFU {s['mfu']:.1%}"),
        ("validation", f"loss {s['val_loss']:.4f} · ppl {s['val_ppl']:.2f} · "
                       f"bpb {s['val_bpb']:.4f}  ({s['eval_seconds']:.1f} s, outside the budget)"),
        ("peak memory", _mib(s["peak_mem"])),
        ("sample", s["sample"].strip()),
        ("run folder", s["run_dir"]),
        ("next", s["sample_command"]),
    ]


def summary_table(s: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, title="run finished", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary_rows(s):
        table.add_row(key, value)
    return table


def make_reporter(dashboard: bool, as_json: bool) -> Dashboard | PlainLog:
    """The dashboard on an interactive terminal; plain lines otherwise (or JSON with --json)."""
    if as_json:
        return JsonLog()
    if dashboard and sys.stdout.isatty():
        return Dashboard()
    return PlainLog()
