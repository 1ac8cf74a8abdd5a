"""Learning rate as a function of the fraction of the budget used: warm-up, stable, decay.

Keying the schedule to the elapsed fraction (of wall-clock time, steps or tokens) rather than to a
step count fixed in advance means a run always ends annealed, however fast the device turns out
to be: the decay reaches its final value exactly at the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TinyLMError


@dataclass(frozen=True)
class Schedule:
    """Warm-up–stable–decay (WSD): linear warm-up, flat peak, linear decay to `final_frac·peak`."""

    peak_lr: float
    warmup: float = 0.03  # fraction of the budget
    decay: float = 0.4  # fraction of the budget spent decaying, ending at the deadline
    final_frac: float = 0.0

    def __post_init__(self) -> None:
        if not (self.peak_lr > 0):
            raise TinyLMError(f"learning rate must be > 0, got {self.peak_lr}")
        if not (0 <= self.warmup < 1 and 0 <= self.decay <= 1 and self.warmup + self.decay <= 1):
            raise TinyLMError("warm-up and decay fractions must lie in [0, 1] and sum to at most 1")
        if not (0 <= self.final_frac <= 1):
            raise TinyLMError("final learning-rate fraction must be in [0, 1], "
                              f"got {self.final_frac}")

    def __call__(self, fraction: float) -> float:
        """Learning rate at `fraction` ∈ [0, 1] of the budget (clamped outside)."""
        f = min(max(fraction, 0.0), 1.0)
        final = self.final_frac * self.peak_lr
        if self.warmup > 0 and f < self.warmup:
            return self.peak_lr * (f / self.warmup)
        decay_start = 1.0 - self.decay
        if f <= decay_start or self.decay == 0:
            return self.peak_lr
        return self.peak_lr + (final - self.peak_lr) * (f - decay_start) / self.decay

    @property
    def final_lr(self) -> float:
        return self(1.0)
