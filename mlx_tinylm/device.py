"""Device and BLAS set-up, and the facts `tinylm info` reports.

The Linux `mlx[cpu]` wheel links a bundled *reference* BLAS (netlib) that runs float32 matmuls at a
few GFLOP/s. Loading an optimised BLAS into the global symbol namespace before MLX is first
imported makes MLX's `sgemm` calls resolve to it instead (measured here: ~4 -> ~180 GFLOP/s).
`setup_blas()` therefore runs when `mlx_tinylm` is imported, before any module imports MLX.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

# Debian's libopenblas0-pthread, then other common locations.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_blas_status: str = "not set up"


def _bundled_reference_blas() -> str | None:
    """Path of the reference BLAS shipped inside the mlx-cpu wheel, if that is what MLX links."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(next(iter(spec.submodule_search_locations)))
    found = glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas*.so*"))
    return found[0] if found else None


def setup_blas() -> str:
    """Load an optimised BLAS globally when MLX would otherwise use its bundled reference one.

    Honours `TINYLM_BLAS`: `off` opts out, a path names the library to load. Returns a short
    status string (also kept for `tinylm info`). Must run before `mlx.core` is imported.
    """
    global _blas_status
    choice = os.environ.get("TINYLM_BLAS", "").strip()
    if not sys.platform.startswith("linux"):
        _blas_status = "not needed on this platform"
    elif choice.lower() == "off":
        _blas_status = "off (TINYLM_BLAS=off)"
    elif "mlx.core" in sys.modules:
        _blas_status = "skipped: mlx.core was imported before mlx_tinylm"
    elif not choice and _bundled_reference_blas() is None:
        _blas_status = "not needed: MLX does not use the bundled reference BLAS"
    else:
        candidates = (choice,) if choice else OPENBLAS_CANDIDATES
        _blas_status = "not found: install libopenblas0-pthread or set TINYLM_BLAS=/path/lib.so"
        for path in candidates:
            if not os.path.exists(path):
                continue
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                _blas_status = f"failed to load {path}: {err}"
                continue
            _blas_status = f"loaded {path}"
            break
    return _blas_status


def loaded_blas_libraries() -> list[str]:
    """BLAS shared libraries mapped into this process (from /proc/self/maps on Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    keys = ("blas", "mkl", "accelerate")
    return sorted(p for p in paths if any(k in os.path.basename(p).lower() for k in keys))


def device_name() -> str:
    """Human name of MLX's default device: Metal GPU, CUDA GPU or CPU."""
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        if mx.metal.is_available():
            return "Metal GPU"
        return "CUDA GPU"
    return "CPU"


def matmul_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    """Float32 n×n matmul rate of MLX on its default device, measured for about `seconds`."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)  # warm-up
    reps, start = 0, time.perf_counter()
    while True:
        mx.eval(a @ b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed / 1e9


def numpy_matmul_gflops(seconds: float = 1.0, n: int = 1024) -> float:
    """Float32 n×n matmul rate of NumPy's BLAS (the NumPy engine's peak for MFU)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed / 1e9


def total_memory_bytes() -> int:
    """Physical memory of this machine (unified memory on Apple silicon)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory_bytes() -> int:
    """Memory a new job can use now: MemAvailable on Linux, total memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_memory_bytes()


@dataclass
class DeviceInfo:
    platform: str
    python: str
    mlx_version: str
    device: str
    blas_setup: str
    blas_libraries: list[str]
    matmul_gflops: float
    memory_total_gb: float
    memory_available_gb: float


def info(probe_seconds: float = 1.0) -> DeviceInfo:
    """Everything `tinylm info` reports, including a short matmul probe."""
    import math

    import mlx.core as mx

    from .errors import TinyLMError

    if not (math.isfinite(probe_seconds) and 0 < probe_seconds <= 600):
        raise TinyLMError(f"--probe-seconds must be a number of seconds in (0, 600], "
                          f"got {probe_seconds}")

    return DeviceInfo(
        platform=f"{platform.system()} {platform.machine()} ({platform.platform()})",
        python=platform.python_version(),
        mlx_version=mx.__version__,
        device=device_name(),
        blas_setup=_blas_status,
        blas_libraries=loaded_blas_libraries(),
        matmul_gflops=round(matmul_gflops(seconds=probe_seconds), 1),
        memory_total_gb=round(total_memory_bytes() / 2**30, 1),
        memory_available_gb=round(available_memory_bytes() / 2**30, 1),
    )


def info_dict(probe_seconds: float = 1.0) -> dict:
    return asdict(info(probe_seconds))
