"""Samplers: small functions from a row of logits to logits, and their composition.

    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw

Truncation runs on the model's own (penalised) distribution, before temperature, so a high
temperature only reshapes the tokens the model already finds plausible and cannot bring the long
tail back. Temperature 0 is greedy (argmax). Draws use a seeded NumPy generator, so a seed
reproduces a sample on every backend. NumPy only: the CLI reads the defaults without importing MLX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TinyLMError


class SamplingError(TinyLMError, ValueError):
    """Sampling settings that cannot be used; the message names the setting and the valid range."""


# ----- samplers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerConfig:
    """How the next token is chosen from the logits.

    The defaults stop tiny models from looping: a 1–10M-parameter model's greedy or pure-sampling
    output falls into repeated phrases ("and they were happy. They were happy. They ..."). A
    repetition penalty of 1.15 over the last 64 tokens makes a just-used token markedly less likely
    without banning the function words and punctuation every sentence needs; top-p 0.95 and min-p
    0.05 cut the long tail of junk tokens that pure sampling picks up; temperature 0.8 keeps the
    story coherent while leaving enough variety that two samples differ.
    """

    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repetition_penalty: float = 1.15  # 1: off
    repetition_window: int = 64

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SamplingError(msg)

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(number(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        need(integer(self.top_k) and self.top_k >= 0,
             f"top-k must be an integer >= 0 (0 turns it off), got {self.top_k}")
        need(number(self.top_p) and 0 < self.top_p <= 1,
             f"top-p must be in (0, 1] (1 turns it off), got {self.top_p}")
        need(number(self.min_p) and 0 <= self.min_p <= 1,
             f"min-p must be in [0, 1] (0 turns it off), got {self.min_p}")
        need(number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        need(integer(self.repetition_window) and self.repetition_window >= 0,
             f"repetition window must be an integer >= 0, got {self.repetition_window}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, recent: Sequence[int],
                             penalty: float) -> np.ndarray:
    """Make each token in `recent` less likely (penalty > 1) or more likely (< 1).

    The usual rule (CTRL, Hugging Face, llama.cpp), so familiar values mean the same here: a
    positive logit is divided by the penalty, a negative one multiplied by it.
    """
    if penalty == 1 or len(recent) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (exactly k, ties broken by index); 0 keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = np.argpartition(-logits, k - 1)[:k]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the nucleus: the fewest most-likely tokens whose probabilities sum to at least p."""
    if p >= 1:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cumulative, p, side="left")) + 1, len(order))
    out = np.full_like(logits, -np.inf)
    keep = order[:n_keep]
    out[keep] = logits[keep]
    return out


def apply_min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens whose probability is at least p times the most likely token's."""
    if p <= 0:
        return logits
    # prob_i >= p * prob_max  <=>  logit_i >= logit_max + ln p  (no softmax needed)
    return np.where(logits >= np.max(logits) + math.log(p), logits, -np.inf)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by the temperature (> 0); below 1 sharpens, above 1 flattens."""
    return logits if temperature == 1 else logits / temperature


def sample_next(logits: np.ndarray, recent: Sequence[int], cfg: SamplerConfig,
                rng: np.random.Generator) -> int:
    """One token id from one row of logits, by the composition in the module docstring."""
    logits = np.asarray(logits, dtype=np.float64)
    window = recent[-cfg.repetition_window:] if cfg.repetition_window else ()
    logits = apply_repetition_penalty(logits, window, cfg.repetition_penalty)
    if cfg.greedy:
        return int(np.argmax(logits))
    logits = apply_top_k(logits, cfg.top_k)
    logits = apply_top_p(logits, cfg.top_p)
    logits = apply_min_p(logits, cfg.min_p)
    probs = softmax(apply_temperature(logits, cfg.temperature))
    # Inverse-CDF draw: one uniform number per token keeps the random stream easy to reason about.
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(index, len(probs) - 1)


def check_max_tokens(max_tokens: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise SamplingError(f"max-tokens must be a positive integer, got {max_tokens}")
