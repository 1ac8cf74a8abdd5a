"""Shared fixtures: a small prepared slice of the real TinyStories text, prepared once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinystories"


def story_slice(src: Path, dst: Path, stories: int) -> Path:
    """The first `stories` stories of a TinyStories file, in the same format."""
    text = src.read_text(encoding="utf-8")
    parts = text.split("\n<|endoftext|>\n")[:stories]
    dst.write_text("\n<|endoftext|>\n".join(parts) + "\n<|endoftext|>\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def slice_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("slice")
    return (story_slice(DATA / "train.txt", folder / "train.txt", 400),
            story_slice(DATA / "valid.txt", folder / "valid.txt", 40))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, slice_files: tuple[Path, Path]):
    from mlx_tinylm.data import prepare

    train, valid = slice_files
    return prepare(files=[str(train)], val_files=[str(valid)], vocab_size=512,
                   out=tmp_path_factory.mktemp("prepared") / "data", progress=False)


def run_cli(*args: str, timeout: float = 180, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m mlx_tinylm ARGS` the way a user would, capturing output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mlx_tinylm", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def assert_clean_failure(result: subprocess.CompletedProcess, needle: str = "") -> None:
    """A user error: non-zero exit, one line on stderr, no traceback anywhere."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
