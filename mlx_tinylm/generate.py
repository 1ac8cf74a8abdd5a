"""Generation: KV-cached decoding inside the context window, composable samplers, token streaming.

    prompt -> [eos] + encode(prompt) -> prefill (one forward) -> sample -> feed one token -> ...

Sliding window. RoPE positions must stay inside what the model was trained on (0 .. context - 1),
so the model never sees more than `context_length` tokens at once. While the sequence fits, each new
token costs one forward over one position against the cached keys and values. When the next token
would not fit, the window jumps: the cache is dropped and the last `context_length // 2` tokens are
prefilled again in one pass at positions 0 .. context/2 - 1. The model therefore always conditions
on between context/2 and context tokens, the prefill cost is paid once per context/2 new tokens, and
positions never leave the trained range. The recompute path (`use_cache=False`) runs the model over
exactly the same window, so both paths give the same logits (tested).

Samplers are small functions from logits to logits (NumPy, float64) and compose in this order:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw. Truncation runs on the
model's own (penalised) distribution, before temperature, so a high temperature only reshapes the
tokens the model already finds plausible and cannot bring the long tail back. Temperature 0 is
greedy (argmax), independent of the seed. Draws use a seeded NumPy generator, so a seed reproduces
a sample on every backend.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from .errors import TinyLMError
from .model import GPT, KVCache, make_cache


class SamplingError(TinyLMError, ValueError):
    """Sampling settings that cannot be used; the message names the setting and the valid range."""


class GenerationError(TinyLMError):
    """Generation cannot go on (for example the model produced non-finite logits)."""


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


# ----- next-token logits inside the context window --------------------------------------------

class NextTokenLogits:
    """Logits of the token after a growing sequence, with or without a KV cache.

    Call it with the whole sequence so far (each call may only append to the previous one). It
    keeps the window described in the module docstring: `start` is where the model's view of the
    sequence begins, and the view is never longer than the context length.
    """

    def __init__(self, model: GPT, use_cache: bool = True, keep: int | None = None):
        self.model = model
        self.context = model.config.context_length
        self.keep = max(1, self.context // 2) if keep is None else keep
        if not 1 <= self.keep <= self.context:
            raise ValueError(f"keep must be in [1, {self.context}], got {self.keep}")
        self.use_cache = use_cache
        self.start: int | None = None
        self.prefills = 0  # forward passes over more than one new position (prompt, window jumps)
        self._cache: list[KVCache] | None = None
        self._cache_start = -1
        self._cached = 0  # the cache holds tokens[_cache_start : _cached]

    def window(self, n: int) -> int:
        """Start of the model's view for a sequence of n tokens (and remember it)."""
        if self.start is None:
            self.start = max(0, n - self.context)
        elif n - self.start > self.context:
            self.start = n - self.keep
        return self.start

    def __call__(self, tokens: Sequence[int]) -> mx.array:
        n = len(tokens)
        if n == 0:
            raise ValueError("need at least one token to predict the next one")
        start = self.window(n)
        if not self.use_cache:
            self.prefills += 1
            return self.model(mx.array([list(tokens[start:n])]))[0, -1]
        if self._cache is None or self._cache_start != start:
            self._cache, self._cache_start, self._cached = make_cache(self.model), start, start
        new = tokens[self._cached:n]
        if len(new) > 1:
            self.prefills += 1
        self._cached = n
        return self.model(mx.array([list(new)]), self._cache)[0, -1]


# ----- token and text streams ------------------------------------------------------------------

@dataclass
class GenerationStats:
    """Counts and timings of one generation; `generate` fills it in as it goes."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    generation_seconds: float = 0.0  # from the first sampled token to the last
    seed: int | None = None
    stop_reason: str = ""  # "eos" or "max_tokens"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def generation_tok_s(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefill_tok_s"] = round(self.prefill_tok_s, 1)
        out["generation_tok_s"] = round(self.generation_tok_s, 1)
        return out


def _check_max_tokens(max_tokens: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise SamplingError(f"max-tokens must be a positive integer, got {max_tokens}")


def new_seed() -> int:
    """A fresh seed from the OS, small enough to retype."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def generate_tokens(model: GPT, prompt: Sequence[int], max_tokens: int,
                    sampler: SamplerConfig | None = None, seed: int | None = None,
                    eos_id: int | None = None, stop_at_eos: bool = True, use_cache: bool = True,
                    stats: GenerationStats | None = None) -> Iterator[int]:
    """Token ids sampled after `prompt` (a non-empty list of ids), one at a time.

    Stops after `max_tokens`, or after yielding `eos_id` when `stop_at_eos`. `seed=None` draws a
    fresh seed (recorded in `stats`); temperature 0 ignores it.
    """
    _check_max_tokens(max_tokens)
    if len(prompt) == 0:
        raise ValueError("the prompt must hold at least one token (use the end-of-document id)")
    sampler = sampler or SamplerConfig()
    stats = stats if stats is not None else GenerationStats()
    stats.seed = new_seed() if seed is None else seed
    rng = np.random.default_rng(stats.seed)
    next_logits = NextTokenLogits(model, use_cache=use_cache)
    tokens = list(prompt)
    stats.prompt_tokens = len(tokens)
    stats.stop_reason = "max_tokens"

    t0 = time.perf_counter()
    for i in range(max_tokens):
        row = np.array(next_logits(tokens).astype(mx.float32))
        if not np.all(np.isfinite(row)):
            raise GenerationError("the model produced non-finite logits; the weights or the "
                                  "backend are broken (check with `tinylm eval`)")
        if i == 0:
            t1 = time.perf_counter()
            stats.prefill_seconds = t1 - t0
        token = sample_next(row, tokens, sampler, rng)
        tokens.append(token)
        stats.generated_tokens += 1
        stats.generation_seconds = time.perf_counter() - t1
        yield token
        if stop_at_eos and token == eos_id:
            stats.stop_reason = "eos"
            return


class TokenizerLike(Protocol):
    """What generation needs from `tokenizer.Tokenizer`."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class Piece(str):
    """One step of a text stream: the text a sampled token completes, with the token id attached.

    A `str`, so pieces print and join like text; `.token` is the sampled id. The text may be empty
    (a token that ends mid-character, or the end-of-document token). The last piece may have
    `token=None`: text the streaming decoder was still holding at the end.
    """

    token: int | None

    def __new__(cls, token: int | None, text: str) -> Piece:
        piece = super().__new__(cls, text)
        piece.token = token
        return piece

    @property
    def text(self) -> str:
        return str(self)


def prompt_tokens(tokenizer: TokenizerLike, prompt: str | Sequence[int]) -> list[int]:
    """The ids a prompt starts from: end-of-document (a document starts after it), then the prompt.

    The model was trained on documents joined by end-of-document tokens, so this makes the prompt
    the start of a new document; an empty prompt starts a document from nothing.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return [tokenizer.eos_id, *ids]


def generate(model: GPT, tokenizer: Any, prompt: str | Sequence[int] = "",
             max_tokens: int = 256, sampler: SamplerConfig | None = None,
             seed: int | None = None, stop_at_eos: bool = True, use_cache: bool = True,
             stats: GenerationStats | None = None) -> Iterator[Piece]:
    """Sample a continuation of `prompt`, yielding a `Piece` per token as soon as it is drawn.

    Concatenating the pieces' text gives exactly `tokenizer.decode` of the generated ids (minus
    the end-of-document token): the streaming decoder holds back partial UTF-8 characters and
    knows the prompt, so word spaces come out right. Pass a `GenerationStats` to get counts and
    timings.
    """
    from .tokenizer import StreamingDecoder

    _check_max_tokens(max_tokens)
    context = prompt_tokens(tokenizer, prompt)
    decoder = StreamingDecoder(tokenizer)
    for token in context[1:]:  # so the first new word gets its leading space right
        decoder.add(token)
    decoder_prefix = decoder.flush()
    del decoder_prefix  # the prompt's own text is the caller's; only the continuation streams
    for token in generate_tokens(model, context, max_tokens, sampler, seed, tokenizer.eos_id,
                                 stop_at_eos, use_cache, stats):
        if token == tokenizer.eos_id:
            yield Piece(token, "")
            continue
        yield Piece(token, decoder.add(token))
    rest = decoder.flush()
    if rest:
        yield Piece(None, rest)

