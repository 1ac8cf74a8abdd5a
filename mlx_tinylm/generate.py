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

The samplers live in sampling.py (NumPy only); generation draws each token with `sample_next`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from .errors import TinyLMError
from .model import GPT, KVCache, make_cache
from .sampling import SamplerConfig, check_max_tokens, sample_next


class GenerationError(TinyLMError):
    """Generation cannot go on (for example the model produced non-finite logits)."""


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

    def summary(self) -> str:
        """One line for stderr."""
        return (f"[{self.prompt_tokens} prompt tokens at {self.prefill_tok_s:,.0f} tok/s, "
                f"{self.generated_tokens} generated at {self.generation_tok_s:,.1f} tok/s, "
                f"stop: {self.stop_reason}, seed {self.seed}]")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefill_tok_s"] = round(self.prefill_tok_s, 1)
        out["generation_tok_s"] = round(self.generation_tok_s, 1)
        return out


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
    check_max_tokens(max_tokens)
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

    Concatenating the pieces gives exactly `tokenizer.decode` of the generated ids (the
    end-of-document token decodes to nothing): the streaming decoder holds back partial UTF-8
    characters until they complete. Pass a `GenerationStats` to get counts and
    timings.
    """
    from .tokenizer import StreamingDecoder

    check_max_tokens(max_tokens)
    context = prompt_tokens(tokenizer, prompt)
    decoder = StreamingDecoder(tokenizer)  # pieces carry their own spaces: no prompt state needed
    for token in generate_tokens(model, context, max_tokens, sampler, seed, tokenizer.eos_id,
                                 stop_at_eos, use_cache, stats):
        if token == tokenizer.eos_id:
            yield Piece(token, "")
            continue
        yield Piece(token, decoder.add(token))
    rest = decoder.flush()
    if rest:
        yield Piece(None, rest)



# ----- loading a run and evaluating it ---------------------------------------------------------

class LoadError(TinyLMError):
    """A run folder that cannot be loaded; the message names the file and what to do."""


def load(run_dir: str | Path) -> tuple[GPT, Any]:
    """(model, tokenizer) of a run folder, ready to sample from or evaluate.

    Only parameters are read from model.safetensors, and they must match config.json name for
    name and shape; everything derived from the config (RoPE frequencies, the causal mask) is
    recomputed by the model, never read from disk, so a stale or missing table cannot poison it.
    """
    from . import checkpoint
    from .config import ModelConfig
    from .tokenizer import Tokenizer

    run_dir = Path(run_dir)
    try:
        raw = checkpoint.read_config(run_dir)
    except checkpoint.CheckpointError as err:
        raise LoadError(str(err)) from None
    try:
        cfg = ModelConfig.from_dict(raw["model"])
    except TinyLMError as err:
        raise LoadError(f"{run_dir / checkpoint.CONFIG} has an invalid model section: "
                        f"{err}") from None
    weights_path, tokenizer_path = run_dir / checkpoint.WEIGHTS, run_dir / checkpoint.TOKENIZER
    for path, what in ((weights_path, "weights"), (tokenizer_path, "tokenizer")):
        if not path.is_file():
            raise LoadError(f"{run_dir} has no {path.name} ({what}); is the run finished? "
                            "A run writes it at its first checkpoint")
    try:
        weights = checkpoint.load_arrays(weights_path)
    except checkpoint.CheckpointError as err:
        raise LoadError(str(err)) from None

    model = GPT(cfg)
    try:
        model.load_named_weights({k: mx.array(v) for k, v in weights.items()})
    except ValueError as err:
        raise LoadError(f"{weights_path} does not match {checkpoint.CONFIG}: {err}") from None
    bad = [k for k, v in weights.items() if not np.all(np.isfinite(v))]
    if bad:
        raise LoadError(f"{weights_path} holds NaN or infinite values (in {bad[0]}); the run "
                        "diverged: train again with a lower --lr")
    mx.eval(model.parameters())

    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except TinyLMError as err:
        raise LoadError(f"{tokenizer_path}: {err}") from None
    except Exception as err:  # sentencepiece reports a bad model file as a RuntimeError
        raise LoadError(f"{tokenizer_path} is not a readable tokenizer ({err})") from None
    if tokenizer.vocab_size != cfg.vocab_size:  # a smaller one would index past its tables
        raise LoadError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model has "
                        f"{cfg.vocab_size}; the tokenizer belongs to another run")
    return model, tokenizer


def evaluate(model: GPT, tokens: np.ndarray, n_bytes: int, context: int | None = None,
             batch_size: int = 16) -> dict[str, float | int]:
    """Exact next-token loss over a token array: every target once, in fixed windows.

    Returns {"loss", "ppl", "bpb", "tokens", "bytes"}: mean nats per token, exp(loss), total nats
    over (ln 2 × n_bytes), the number of predicted tokens and the bytes the text had.
    """
    import mlx.nn as nn


    context = model.config.context_length if context is None else context
    if not 1 <= context <= model.config.context_length:
        raise TinyLMError(f"evaluation context must be in [1, {model.config.context_length}], "
                          f"got {context}")
    if len(tokens) < 2:
        raise TinyLMError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    if n_bytes <= 0:
        raise TinyLMError(f"the evaluated text must have a positive byte count, got {n_bytes}")

    # Not compiled: measured on the CPU backend, mx.compile made this no faster.
    def batch_nats(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
        losses = nn.losses.cross_entropy(model(mx.array(x)), mx.array(y), reduction="none")
        return mx.sum(losses * mx.array(mask, dtype=mx.float32)).item()

    return window_metrics(batch_nats, tokens, n_bytes, context, batch_size)


def window_metrics(batch_nats: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
                   tokens: np.ndarray, n_bytes: int, context: int, batch_size: int,
                   max_batches: int | None = None) -> dict[str, float | int]:
    """loss/ppl/bpb from summed nats over the fixed windows of `eval_batches`.

    `batch_nats(inputs, targets, mask)` returns the summed nats of one batch's masked targets.
    Over every window bpb is exact; over the first `max_batches` only (a quick periodic check),
    the bytes are the split's bytes in proportion to the targets covered.
    """
    from .data import eval_batches

    total, count = 0.0, 0
    for i, (x, y, mask) in enumerate(eval_batches(tokens, context, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        total += float(batch_nats(x, y, mask))  # float32 per batch, float64 across batches
        count += int(np.sum(mask))
    if count == 0:
        raise TinyLMError("there are no tokens to evaluate")
    covered = n_bytes if count >= len(tokens) - 1 else n_bytes * count / (len(tokens) - 1)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": total / (math.log(2) * covered),
            "tokens": count, "bytes": int(round(covered))}


def encode_files(tokenizer: Any, files: Sequence[str | Path]) -> tuple[np.ndarray, int]:
    """(tokens, UTF-8 bytes) of text files in the layout of a prepared split (see data.py):
    [eos] doc [eos] doc ... [eos], documents read and split exactly as `tinylm data prepare`
    reads them, so every token of every document (and each document's end) is a target and the
    byte count is the documents' text."""
    from . import data

    docs: list[str] = []
    for path in files:
        docs.extend(data.read_documents(path))
    ids = [tokenizer.eos_id]
    for encoded in tokenizer.encode_batch(docs):
        ids.extend(encoded)
        ids.append(tokenizer.eos_id)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return np.asarray(ids, dtype=data.token_dtype(tokenizer.vocab_size)), n_bytes


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def evaluate_run(run_dir: str | Path, data: str | Path | None = None,
                 files: Sequence[str | Path] | None = None,
                 batch_size: int = 16) -> dict[str, float | int]:
    """Exact metrics of a run on text files, a prepared data folder's validation split, or (with
    neither) the validation split of the data the run was trained on."""
    from . import checkpoint
    from .data import load_prepared

    if data is not None and files:
        raise TinyLMError("give either --data or --files, not both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TinyLMError(f"batch size must be a positive integer, got {batch_size}")
    model, tokenizer = load(run_dir)
    if files:
        tokens, n_bytes = encode_files(tokenizer, files)
    else:
        if data is None:
            data = checkpoint.read_config(Path(run_dir)).get("data", {}).get("path")
            if not data or not Path(data).is_dir():
                raise TinyLMError(f"the data {run_dir} was trained on is not at {data!r} any "
                                  "more; pass --data DIR or --files PATH")
        prepared = load_prepared(data)
        if not _same_file(Path(prepared.tokenizer.model_path),
                          Path(run_dir) / checkpoint.TOKENIZER):
            raise TinyLMError(f"{data} was tokenised with a different tokenizer than {run_dir}; "
                              "evaluate raw text with --files instead")
        tokens, n_bytes = prepared.tokens("val"), prepared.n_bytes("val")
    return evaluate(model, tokens, n_bytes, batch_size=batch_size)
