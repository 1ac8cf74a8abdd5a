"""Run folders: atomic checkpoints, resume state, metrics log and a lock.

Layout of `models/<run>/` (see design.md):

    config.json         model, optimizer and training settings, tokenizer, versions
    model.safetensors   latest weights (what `sample` and `eval` load)
    tokenizer.model     the sentencepiece model the run was trained with
    metrics.jsonl       one JSON object per log event
    checkpoint/         everything `--resume` needs: weights, optimizer state, state.json
    run.lock            PID of the process training in this folder

A checkpoint is written into `checkpoint.new/`, flushed to disk, then swapped in with renames, so
at every instant the folder holds one complete checkpoint (`checkpoint/`, or `checkpoint.old/`
during the swap) and never a half-written one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TinyLMError

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
LOCK = "run.lock"

# Test-only: seconds to sleep while a checkpoint is half written (kill-at-any-moment tests).
_DELAY_ENV = "TINYLM_TEST_CHECKPOINT_DELAY"


class CheckpointError(TinyLMError):
    pass


# ----- low-level atomic writes ------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(err: OSError, folder: Path, needed: int) -> CheckpointError:
    return CheckpointError(
        f"no space left on the disk holding {folder} (about {needed / 2**20:.1f} MiB needed); "
        "free some space and resume with --resume")


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write name -> array as safetensors at `path` atomically (temp file + rename)."""
    import mlx.core as mx

    tmp = path.with_name(path.name + ".tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), {k: mx.array(v) for k, v in arrays.items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise _disk_full(err, path.parent, sum(a.nbytes for a in arrays.values())) from None
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None
    except RuntimeError as err:  # MLX reports write failures as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {err}") from None


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file; a missing, truncated or corrupt file is a one-line error."""
    import mlx.core as mx

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        arrays = mx.load(str(path), format="safetensors")
        return {k: np.array(v) for k, v in arrays.items()}
    except Exception as err:  # MLX raises ValueError/RuntimeError for bad files
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); "
                              "the file is truncated or corrupt") from None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise _disk_full(err, path.parent, 1 << 16) from None
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


# ----- run folder -------------------------------------------------------------------------------

def read_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run, with its format version checked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    cfg = read_json(run_dir / CONFIG)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{run_dir / CONFIG} has no 'model' section; is this a run folder?")
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{run_dir} was written by a newer mlx-tinylm (format {version}, "
                              f"this one reads up to {FORMAT_VERSION}); upgrade mlx-tinylm")
    return cfg


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    write_json(Path(run_dir) / CONFIG, {"format_version": FORMAT_VERSION, **cfg})


def save_checkpoint(run_dir: Path, weights: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    """Write weights, optimizer state and loop state as one atomic checkpoint, then export the
    weights to the run folder's model.safetensors for sampling."""
    run_dir = Path(run_dir)
    cur = run_dir / CHECKPOINT
    new, old = cur.with_name(CHECKPOINT + ".new"), cur.with_name(CHECKPOINT + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        save_arrays(new / WEIGHTS, weights)
        if float(os.environ.get(_DELAY_ENV, "0") or 0) > 0:
            time.sleep(float(os.environ[_DELAY_ENV]))
        save_arrays(new / OPTIMIZER, optimizer)
        write_json(new / STATE, state)
        _fsync_dir(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    # Swap: between the two renames a complete checkpoint sits in checkpoint.old/.
    shutil.rmtree(old, ignore_errors=True)
    if cur.exists():
        os.replace(cur, old)
    os.replace(new, cur)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    save_arrays(run_dir / WEIGHTS, weights)


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The complete checkpoint folder of a run, or None when it has none yet."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = run_dir / name
        if (path / STATE).is_file():
            return path
    return None


def load_checkpoint(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                            dict[str, Any]]:
    """(weights, optimizer state, loop state) of the run's last complete checkpoint."""
    path = checkpoint_dir(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (the run stopped before "
                              "its first save); start it again without --resume")
    return load_arrays(path / WEIGHTS), load_arrays(path / OPTIMIZER), read_json(path / STATE)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill; the rest is still good
    return records


# ----- lock -------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: Path, warn: Any = None) -> Iterator[None]:
    """Hold `run.lock` while training in `run_dir`; refuse a folder another live process holds.

    A lock left by a process that no longer exists is taken over (with a warning via `warn`).
    """
    path = Path(run_dir) / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid) and pid != os.getpid():
                raise CheckpointError(f"{run_dir} is in use by another training process "
                                      f"(PID {pid}); wait for it or choose another --out") from None
            if warn is not None:
                warn(f"taking over a stale lock in {run_dir} (PID {pid or '?'} is gone)")
            path.unlink(missing_ok=True)
    else:
        raise CheckpointError(f"cannot lock {run_dir}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
