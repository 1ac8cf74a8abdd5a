"""mlx-tinylm: train the strongest tiny GPT your laptop can make in five minutes."""

from . import device as _device

__version__ = "0.1.0"

# Must happen before any module imports mlx.core (see device.py).
_device.setup_blas()
_device.setup_allocator()
