"""Learning rate as a function of the fraction of the budget used.

Keying the schedule to the elapsed fraction (of wall-clock time, steps or tokens) rather than to a
step count fixed in advance means a run always ends annealed, however fast the device turns out
to be: the decay reaches its final value exactly at the deadline.

Two shapes, both starting with a linear warm-up from 0:
- "wsd" (warm-up–stable–decay): flat at the peak, then a linear decay over the last `decay` of
  the budget to `final_frac · peak`.
- "cosine": a half cosine from the peak at the end of warm-up to `final_frac · peak` at the
  deadline (nanoGPT's shape; `decay` is unused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import SCHEDULES
from .errors import TinyLMError


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then WSD or cosine down to `final_frac·peak` at the end of the budget."""

    peak_lr: float
    warmup: float = 0.03  # fraction of the budget
    decay: float = 0.4  # WSD: fraction of the budget spent decaying, ending at the deadline
    final_frac: float = 0.0
    shape: str = "wsd"

    def __post_init__(self) -> None:
        if not (self.peak_lr > 0):
            raise TinyLMError(f"learning rate must be > 0, got {self.peak_lr}")
        if not (0 <= self.warmup < 1 and 0 <= self.decay <= 1 and self.warmup + self.decay <= 1):
            raise TinyLMError("warm-up and decay fractions must lie in [0, 1] and sum to at most 1")
        if not (0 <= self.final_frac <= 1):
            raise TinyLMError("final learning-rate fraction must be in [0, 1], "
                              f"got {self.final_frac}")
        if self.shape not in SCHEDULES:
            raise TinyLMError(f"schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {self.shape!r}")

    def __call__(self, fraction: float) -> float:
        """Learning rate at `fraction` ∈ [0, 1] of the budget (clamped outside)."""
        f = min(max(fraction, 0.0), 1.0)
        final = self.final_frac * self.peak_lr
        if self.warmup > 0 and f < self.warmup:
            return self.peak_lr * (f / self.warmup)
        if self.shape == "cosine":
            progress = (f - self.warmup) / (1.0 - self.warmup)
            return final + (self.peak_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = 1.0 - self.decay
        if f <= decay_start or self.decay == 0:
            return self.peak_lr
        return self.peak_lr + (final - self.peak_lr) * (f - decay_start) / self.decay

    @property
    def final_lr(self) -> float:
        return self(1.0)
