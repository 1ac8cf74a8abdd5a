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
during the swap) and never a half-written one. A process killed at any instant leaves the folder
in one of those states, and the next save or load picks up from it.

Safetensors files are written here (not by MLX) so that write failures arrive as `OSError`s with
an errno: a full disk becomes a one-line error naming the folder and the space a checkpoint needs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
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

# Test-only: seconds to sleep while a checkpoint is half written, and again between the two
# renames of the swap, so kill and signal tests can land inside those windows.
_DELAY_ENV = "TINYLM_TEST_CHECKPOINT_DELAY"


class CheckpointError(TinyLMError):
    pass


class DiskFullError(CheckpointError):
    """The file system holding a run folder has no room for what had to be written."""


def _test_pause() -> None:
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


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


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(folder: Path, needed: int) -> DiskFullError:
    free = _free_bytes(folder)
    have = f", {_mib(free)} free" if free is not None else ""
    return DiskFullError(f"no space left on the disk holding {folder} (about {_mib(needed)} "
                         f"needed{have}); free some space and try again")


# safetensors: 8-byte little-endian header length, a JSON header, then the raw little-endian data.
# MLX reads no float64, so (as mx.array would) float64 is stored as float32.
_SAFETENSORS_DTYPES = {
    "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
    "uint8": "U8", "bool": "BOOL",
}


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write name -> array as safetensors at `path` atomically (temp file, fsync, rename)."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        code = _SAFETENSORS_DTYPES.get(a.dtype.name)
        if code is None:
            raise TypeError(f"cannot save {name}: dtype {a.dtype} has no safetensors code")
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a)
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for a in blobs:
                f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _NO_SPACE:
            raise _disk_full(path.parent, 8 + len(head) + offset) from None
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file; a missing, truncated or corrupt file is a one-line error."""
    import mlx.core as mx

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        arrays = mx.load(str(path), format="safetensors")
        return {k: np.array(v) for k, v in arrays.items()}
    except Exception as err:  # MLX raises ValueError/RuntimeError for bad files
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(err)}); "
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
        if err.errno in _NO_SPACE:
            raise _disk_full(path.parent, 1 << 16) from None
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(err)}); the file is "
                              "corrupt") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None


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
    weights to the run folder's model.safetensors for sampling.

    A full disk raises `DiskFullError` naming the run folder and the space a checkpoint needs;
    the previous checkpoint is left as it was.
    """
    run_dir = Path(run_dir)
    cur = run_dir / CHECKPOINT
    new, old = cur.with_name(CHECKPOINT + ".new"), cur.with_name(CHECKPOINT + ".old")
    # A process killed between the two renames below left its checkpoint in checkpoint.old/.
    if not (cur / STATE).is_file() and (old / STATE).is_file():
        shutil.rmtree(cur, ignore_errors=True)
        os.replace(old, cur)
    needed = sum(np.asarray(a).nbytes for a in (*weights.values(), *optimizer.values())) + 2**16
    shutil.rmtree(new, ignore_errors=True)
    try:
        new.mkdir(parents=True)
        save_arrays(new / WEIGHTS, weights)
        _test_pause()
        save_arrays(new / OPTIMIZER, optimizer)
        write_json(new / STATE, state)
        _fsync_dir(new)
    except BaseException as err:
        shutil.rmtree(new, ignore_errors=True)
        if isinstance(err, DiskFullError) or (isinstance(err, OSError)
                                              and err.errno in _NO_SPACE):
            raise _checkpoint_disk_full(run_dir, needed) from None
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write a checkpoint in {run_dir}: "
                                  f"{err.strerror or err}") from None
        raise
    # Swap: between the two renames a complete checkpoint sits in checkpoint.old/.
    shutil.rmtree(old, ignore_errors=True)
    if cur.exists():
        os.replace(cur, old)
        _test_pause()
    os.replace(new, cur)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    try:
        save_arrays(run_dir / WEIGHTS, weights)
    except DiskFullError:
        raise _checkpoint_disk_full(run_dir, needed) from None


def _checkpoint_disk_full(run_dir: Path, needed: int, what: str = "a checkpoint"
                          ) -> DiskFullError:
    free = _free_bytes(run_dir)
    have = f", {_mib(free)} free" if free is not None else ""
    if checkpoint_dir(run_dir) is not None:
        then = ("the last checkpoint is intact: free some space, then continue with "
                f"`tinylm train --resume --out {run_dir}`")
    else:
        then = "free some space and start the run again"
    return DiskFullError(f"no space left on the disk holding {run_dir}: {what} needs about "
                         f"{_mib(needed)}{have}; {then}")


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


def check_weights(weights: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                  where: Path | None) -> None:
    """Weights must have exactly the config's parameter names and shapes (a one-line error)."""
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    wrong = [k for k in shapes if k in weights and tuple(weights[k].shape) != shapes[k]]
    if missing or extra or wrong:
        what = (f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, config.json says "
                f"{shapes[wrong[0]]}" if wrong else
                f"missing {', '.join(missing[:2]) or 'nothing'}, unexpected "
                f"{', '.join(extra[:2]) or 'nothing'}")
        raise CheckpointError(f"the weights in {where} do not match config.json ({what}); "
                              "config.json or the checkpoint was changed or comes from another run")


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    path = Path(run_dir) / METRICS
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut by a kill: end it, so this one stays whole
                    line = b"\n" + line
            f.write(line)
    except OSError as err:
        if err.errno in _NO_SPACE:
            raise _checkpoint_disk_full(Path(run_dir), len(line), "the metrics log") from None
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


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
