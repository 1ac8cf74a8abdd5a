"""Generation: the KV cache matches recomputation (across window jumps too), samplers do what they
say, sampling is reproducible."""

# mlx_tinylm first: it loads OpenBLAS before mlx.core is imported (hence no isort here).
import mlx_tinylm  # noqa: F401, I001
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_tinylm.config import ModelConfig
from mlx_tinylm.generate import GenerationError, NextTokenLogits, generate_tokens
from mlx_tinylm.model import GPT, make_cache
from mlx_tinylm.sampling import (
    SamplerConfig,
    SamplingError,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    sample_next,
    softmax,
)

# A large init_std gives peaked, position-dependent logits, so a wrong cache entry or a wrong RoPE
# position moves them by far more than the tolerance.
CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, context_length=24,
                  init_std=0.3)


@pytest.fixture(scope="module")
def model() -> GPT:
    m = GPT(CFG)
    m.init_weights(seed=0)
    return m


def random_tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).tolist()


def test_cached_logits_equal_recompute_across_window_jumps(model):
    tokens = random_tokens(4 * CFG.context_length)
    cached, recompute = NextTokenLogits(model), NextTokenLogits(model, use_cache=False)
    starts = set()
    for n in range(5, len(tokens) + 1):
        a = np.array(cached(tokens[:n]))
        b = np.array(recompute(tokens[:n]))
        start = cached.window(n)
        # The same window, computed from scratch, straight through the model.
        direct = np.array(model(mx.array([tokens[start:n]]))[0, -1])
        assert np.abs(a - b).max() < 1e-4, n
        assert np.abs(a - direct).max() < 1e-4, n
        assert n - start <= CFG.context_length  # RoPE positions stay in the trained range
        starts.add(start)
    assert len(starts) >= 4  # the window jumped several times
    assert cached.prefills == len(starts)  # one prefill per jump, single positions otherwise


def test_kv_cache_fed_in_chunks_matches_one_full_forward(model):
    # Chunks after a cached prefix rely on the causal mask lining up with the cached keys.
    tokens = mx.array([random_tokens(CFG.context_length, seed=5)])
    cache = make_cache(model)
    chunks = [model(tokens[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 19), (19, 24))]
    full = np.array(model(tokens))
    assert np.abs(np.array(mx.concatenate(chunks, axis=1)) - full).max() < 1e-4


def test_window_keeps_half_the_context_after_a_jump(model):
    next_logits = NextTokenLogits(model)
    ctx = CFG.context_length
    tokens = random_tokens(3 * ctx)
    seen = []
    for n in range(1, len(tokens) + 1):
        next_logits(tokens[:n])
        seen.append(n - next_logits.start)
    assert max(seen) == ctx
    assert min(seen[ctx:]) == ctx // 2


def test_prompt_longer_than_context_uses_its_last_context_tokens(model):
    tokens = random_tokens(3 * CFG.context_length + 5, seed=1)
    got = np.array(NextTokenLogits(model)(tokens))
    want = np.array(model(mx.array([tokens[-CFG.context_length:]]))[0, -1])
    assert np.abs(got - want).max() < 1e-4


def test_greedy_is_deterministic_and_the_same_with_and_without_cache(model):
    greedy = SamplerConfig(temperature=0)
    prompt = random_tokens(7, seed=2)
    runs = [list(generate_tokens(model, prompt, 60, greedy, seed=s, use_cache=c))
            for s, c in ((0, True), (1, True), (2, False))]
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 60


def test_same_seed_same_sample_and_other_seed_other_sample(model):
    hot = SamplerConfig(temperature=1.0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    prompt = random_tokens(3, seed=3)
    a = list(generate_tokens(model, prompt, 40, hot, seed=123))
    b = list(generate_tokens(model, prompt, 40, hot, seed=123))
    c = list(generate_tokens(model, prompt, 40, hot, seed=124))
    assert a == b
    assert a != c


def test_generation_stops_at_eos_only_when_asked(model):
    prompt = random_tokens(3, seed=4)
    greedy = SamplerConfig(temperature=0, repetition_penalty=1.0)
    first = next(iter(generate_tokens(model, prompt, 5, greedy)))
    stopped = list(generate_tokens(model, prompt, 5, greedy, eos_id=first))
    assert stopped == [first]
    assert len(list(generate_tokens(model, prompt, 5, greedy, eos_id=first,
                                    stop_at_eos=False))) == 5


def test_non_finite_logits_stop_generation_with_a_clear_error():
    broken = GPT(CFG)
    broken.update({"model": {"norm": {"weight": mx.full((CFG.d_model,), float("nan"))}}})
    with pytest.raises(GenerationError, match="non-finite"):
        list(generate_tokens(broken, [1, 2], 3))


# ----- samplers ------------------------------------------------------------------------------

def test_top_k_keeps_exactly_the_k_largest():
    logits = np.random.default_rng(0).normal(size=50)
    kept = np.isfinite(apply_top_k(logits, 5))
    assert kept.sum() == 5
    assert set(np.flatnonzero(kept)) == set(np.argsort(-logits)[:5])
    assert np.array_equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    def kept(p):
        return set(np.flatnonzero(np.isfinite(apply_top_p(logits, p))))
    assert kept(0.1) == {1}
    assert kept(0.79) == {1, 3}
    assert kept(0.81) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}


def test_min_p_keeps_tokens_at_least_p_times_the_top_probability():
    probs = np.array([0.5, 0.3, 0.06, 0.04, 0.1])
    kept = np.isfinite(apply_min_p(np.log(probs), 0.1))
    assert list(kept) == [True, True, True, False, True]
    assert np.isfinite(apply_min_p(np.log(probs), 0.0)).all()


def test_repetition_penalty_lowers_recent_tokens_whatever_their_sign():
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 1.25)
    assert out[0] < logits[0] and out[1] < logits[1]
    assert out[2] == logits[2] and out[3] == logits[3]
    assert softmax(out)[0] < softmax(logits)[0]
    assert apply_repetition_penalty(logits, [0], 0.8)[0] > logits[0]


def test_repetition_penalty_only_looks_at_the_recent_window():
    logits = np.array([2.0, 1.9, -5.0])
    cfg = SamplerConfig(temperature=0, repetition_penalty=1.3, repetition_window=2)
    rng = np.random.default_rng(0)
    assert sample_next(logits, [2, 2], cfg, rng) == 0
    assert sample_next(logits, [0, 2], cfg, rng) == 1  # 0 was just used: 2/1.3 < 1.9
    assert sample_next(logits, [0, 2, 2], cfg, rng) == 0  # 0 fell out of the window


def test_sampling_follows_the_tempered_distribution():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    cfg = SamplerConfig(temperature=0.5, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_next(logits, [], cfg, rng) for _ in range(20000)], minlength=4)
    assert np.abs(counts / counts.sum() - softmax(logits / 0.5)).max() < 0.015


def test_high_temperature_cannot_bring_back_truncated_tokens():
    logits = np.array([5.0, 4.5, -3.0, -4.0])
    cfg = SamplerConfig(temperature=50.0, top_k=2, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    assert {sample_next(logits, [], cfg, rng) for _ in range(500)} == {0, 1}


@pytest.mark.parametrize("change, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -1}, "top-k"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"min_p": -0.5}, "min-p"),
    ({"repetition_penalty": 0.0}, "repetition penalty"),
    ({"temperature": math.nan}, "temperature"),
])
def test_bad_sampler_settings_are_refused_by_name(change, message):
    with pytest.raises(SamplingError, match=message):
        SamplerConfig(**change)


def test_max_tokens_must_be_positive(model):
    with pytest.raises(SamplingError, match="max-tokens"):
        list(generate_tokens(model, [1], 0))
