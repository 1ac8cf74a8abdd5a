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
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# Debian's libopenblas0-pthread, then other common locations.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_blas_status: str = "not set up"
_blas_lib: ctypes.CDLL | None = None
_allocator_status: str = "not set up"

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


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
    global _blas_status, _blas_lib
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
                _blas_lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                _blas_status = f"failed to load {path}: {err}"
                continue
            _blas_status = f"loaded {path}"
            break
    return _blas_status


def set_blas_threads(n: int) -> bool:
    """Set the thread count of the OpenBLAS that MLX calls; False when there is none to set.

    model.make_train_step splits a CPU batch across two MLX streams that call BLAS at the same
    time; each then gets its share of the cores instead of all of them.
    """
    lib = _blas_lib if _blas_lib is not None else ctypes.CDLL(None)
    fn = getattr(lib, "openblas_set_num_threads", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int]
    fn(max(1, int(n)))
    return True


def get_blas_threads() -> int | None:
    """Thread count of the OpenBLAS that MLX calls, or None when there is none to ask."""
    lib = _blas_lib if _blas_lib is not None else ctypes.CDLL(None)
    fn = getattr(lib, "openblas_get_num_threads", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    return int(fn())


def setup_allocator() -> str:
    """Keep large freed buffers mapped instead of returning them to the kernel (glibc only).

    MLX's CPU allocator (and NumPy) take each buffer from malloc and free it after use; glibc
    serves requests above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps them on
    free, so every step page-faults its logits and attention scores in again, 4 KB at a time
    (measured here: `a + 1` on a 134 MB array 93 -> 28 ms, the tiny model's MLX step ~20%
    faster). Raising the mmap and trim thresholds makes glibc reuse heap memory instead. Peak
    memory is unchanged; freed memory stays with the process. `TINYLM_ALLOCATOR=off` opts out.
    """
    global _allocator_status
    if not sys.platform.startswith("linux"):
        _allocator_status = "not needed on this platform"
    elif os.environ.get("TINYLM_ALLOCATOR", "").strip().lower() == "off":
        _allocator_status = "off (TINYLM_ALLOCATOR=off)"
    else:
        try:
            libc = ctypes.CDLL(None)
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1)
            _allocator_status = "glibc: large buffers reused" if ok else "mallopt refused"
        except (OSError, AttributeError):
            _allocator_status = "not glibc: unchanged"
    return _allocator_status


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


def _best_rate(once: Callable[[], None], n: int, seconds: float) -> float:
    """GFLOP/s of the fastest n×n product seen in about `seconds` (after one warm-up).

    The fastest product, not the mean, is the device's peak: on a busy machine the mean falls
    with the load while the training step it is compared with may not, giving MFU > 100%.
    """
    once()
    best, start = math.inf, time.perf_counter()
    while True:
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds:
            return 2 * n**3 / best / 1e9


def matmul_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    """Float32 n×n matmul peak of MLX on its default device, probed for about `seconds`."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    return _best_rate(lambda: mx.eval(a @ b), n, seconds)


def numpy_matmul_gflops(seconds: float = 1.0, n: int = 1024) -> float:
    """Float32 n×n matmul peak of NumPy's BLAS (the NumPy engine's peak for MFU)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return _best_rate(lambda: a @ b, n, seconds)


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
    allocator: str
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
        allocator=_allocator_status,
        blas_libraries=loaded_blas_libraries(),
        matmul_gflops=round(matmul_gflops(seconds=probe_seconds), 1),
        memory_total_gb=round(total_memory_bytes() / 2**30, 1),
        memory_available_gb=round(available_memory_bytes() / 2**30, 1),
    )


def info_dict(probe_seconds: float = 1.0) -> dict:
    return asdict(info(probe_seconds))
