"""Counter-based RNG (``respec.engine.rng``) and ``SamplingParams`` validation."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from respec.engine import rng
from respec.engine.params import SamplingParams

MASK64 = (1 << 64) - 1


def some_keys(n: int, seed: int = 0) -> np.ndarray:
    return np.array([rng.sample_key(seed, i) for i in range(n)], dtype=np.uint64)


def inverse_splitmix64(value: int) -> int:
    """The x with splitmix64(x) == value, in Python ints (each step of the finaliser is invertible)."""
    def unshift(y: int, s: int) -> int:  # inverse of x ^ (x >> s)
        x = y
        for _ in range(64 // s + 1):
            x = y ^ (x >> s)
        return x

    z = unshift(value, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & MASK64
    z = unshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & MASK64
    z = unshift(z, 30)
    return (z - 0x9E3779B97F4A7C15) & MASK64


# ---------------------------------------------------------------------------------------------- uniforms

def test_uniforms_open_interval_and_dtype():
    keys = some_keys(1000)
    counters = np.arange(1000, dtype=np.int64)
    for stream in (0, 1, 7):
        u = rng.uniforms(np.repeat(keys, 100), np.tile(counters[:100], 1000), stream)
        assert u.dtype == np.float64 and u.shape == (100_000,)
        assert (u > 0).all() and (u < 1).all()


def test_inverse_splitmix64_helper():
    x = np.array([0, 1, 12345, MASK64], dtype=np.uint64)
    assert [inverse_splitmix64(int(v)) for v in rng.splitmix64(x)] == [int(v) for v in x]


def test_uniforms_lowest_output_is_positive():
    counter = np.array([5], dtype=np.int64)
    key = inverse_splitmix64(0) ^ int(rng.splitmix64(counter.astype(np.uint64))[0])
    u = rng.uniforms(np.array([key], dtype=np.uint64), counter)
    assert 0 < u[0] <= 2.0 ** -53


def test_uniforms_highest_output_is_below_one():
    counter = np.array([5], dtype=np.int64)
    key = inverse_splitmix64(MASK64) ^ int(rng.splitmix64(counter.astype(np.uint64))[0])
    u = rng.uniforms(np.array([key], dtype=np.uint64), counter)
    assert u[0] < 1.0


def test_uniforms_deterministic():
    keys, counters = some_keys(64, seed=3), np.arange(64, dtype=np.int64) * 7
    a = rng.uniforms(keys, counters, stream=2)
    b = rng.uniforms(keys.copy(), counters.copy(), stream=2)
    assert np.array_equal(a, b)
    assert np.array_equal(keys, some_keys(64, seed=3))  # inputs are not modified


def test_uniforms_differ_across_streams_counters_keys():
    keys, counters = some_keys(256), np.arange(256, dtype=np.int64)
    base = rng.uniforms(keys, counters)
    variants = [rng.uniforms(keys, counters, stream=1), rng.uniforms(keys, counters + 1),
                rng.uniforms(keys ^ np.uint64(1), counters), rng.uniforms(some_keys(256, seed=1), counters)]
    for other in variants:
        assert not np.isclose(base, other, rtol=0, atol=1e-12).any()
    # Within one call, distinct (key, counter) pairs give distinct values.
    grid = rng.uniforms(np.repeat(keys[:50], 50), np.tile(counters[:50], 50))
    assert np.unique(grid).size == grid.size


def test_uniforms_batch_invariance():
    keys, counters = some_keys(40, seed=11), np.random.default_rng(0).integers(0, 1 << 30, 40)
    batched = rng.uniforms(keys, counters, stream=3)
    single = np.array([rng.uniforms(keys[i:i + 1], counters[i:i + 1], stream=3)[0] for i in range(40)])
    assert np.array_equal(batched, single)
    perm = np.random.default_rng(1).permutation(40)
    assert np.array_equal(rng.uniforms(keys[perm], counters[perm], stream=3), batched[perm])
    assert np.array_equal(rng.uniforms(keys[:7], counters[:7], stream=3), batched[:7])


@pytest.mark.parametrize("layout", ["one_key_many_counters", "many_keys_one_counter"])
def test_uniforms_are_uniform(layout):
    n, bins = 1_000_000, 100
    if layout == "one_key_many_counters":
        keys, counters = np.full(n, rng.sample_key(42, 0), dtype=np.uint64), np.arange(n, dtype=np.int64)
    else:
        keys, counters = rng.splitmix64(np.arange(n, dtype=np.uint64)), np.zeros(n, dtype=np.int64)
    u = rng.uniforms(keys, counters)
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 1e-3
    counts = np.bincount((u * bins).astype(np.int64), minlength=bins)
    assert counts.size == bins
    expected = n / bins
    stat, dof = float(((counts - expected) ** 2 / expected).sum()), bins - 1
    # chi2(99): mean 99, sd ~14; 99 + 6 sd is a p-value far below 1e-6 and still catches real bias.
    assert stat < dof + 6 * math.sqrt(2 * dof)
    # Lag-1 correlation of consecutive counters is negligible.
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / math.sqrt(n)


def test_sample_key_distinct_and_deterministic():
    keys = {rng.sample_key(seed, i) for seed in [0, 1, 2, 12345, 2**63 - 1] for i in range(200)}
    assert len(keys) == 5 * 200
    assert all(0 <= k <= MASK64 for k in keys)
    assert rng.sample_key(7, 3) == rng.sample_key(7, 3)
    assert rng.sample_key(7, 3) != rng.sample_key(3, 7)


def test_random_seed_range():
    seeds = {rng.random_seed() for _ in range(100)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**63 for s in seeds)
    # A fresh seed is a valid SamplingParams seed.
    SamplingParams(seed=rng.random_seed())


def test_global_rngs_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    rng.uniforms(some_keys(100), np.arange(100, dtype=np.int64), stream=1)
    rng.sample_key(rng.random_seed(), 4)
    rng.random_seed()
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state
    # The comparison would notice a draw.
    torch.rand(1)
    np.random.rand()
    random.random()
    assert not torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[2] != np_state[2]
    assert random.getstate() != py_state


# ---------------------------------------------------------------------------------------------- params

@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 2.0), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", 0), ("top_p", 1.5),
    ("top_p", -0.5), ("top_p", float("nan")), ("top_k", -1), ("top_k", 3.5), ("max_new_tokens", -1),
    ("stop_token_ids", [-3]), ("stop_token_ids", [1, 2.0]), ("stop", [""]), ("stop", ""), ("stop", ["ok", 3]),
    ("seed", -1), ("seed", 1.5),
])
def test_bad_values_raise(field, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}:") as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed) == (1, 1.0, 1.0, 0, None)
    assert p.stop == () and p.stop_token_ids == () and not p.greedy


def test_good_values_and_normalisation():
    p = SamplingParams(n=4, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=0, stop_token_ids=[2, 0],
                       stop=["a", "bc"], ignore_eos=True, seed=0)
    assert p.stop_token_ids == (2, 0) and isinstance(p.stop_token_ids, tuple)
    assert p.stop == ("a", "bc") and isinstance(p.stop, tuple)
    assert p.greedy
    hash(p)  # lists were turned into tuples, so the params are hashable
    assert p == SamplingParams(n=4, temperature=0.0, max_new_tokens=0, stop_token_ids=(2, 0), stop=("a", "bc"),
                               ignore_eos=True, seed=0)
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(top_p=1e-6, top_k=1, seed=2**63 - 1, temperature=2.5).top_p == 1e-6


@pytest.mark.parametrize("temperature,greedy", [(0.0, True), (0, True), (1e-6, False), (0.7, False), (2.0, False)])
def test_greedy_property(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_params_are_frozen():
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]
