"""The batched sampling maths of ``respec.engine.sampling``, checked without a model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from respec.engine import rng
from respec.engine.sampling import (
    RowParams,
    filter_top_k_top_p,
    processed_logprobs,
    sample,
    sample_tokens,
)
from tests.helpers import goodness_of_fit

N_DRAWS = 200_000
TVD_LIMIT = 0.01
P_VALUE_LIMIT = 1e-4


def row_params(temperature, top_k=0, top_p=1.0, batch: int | None = None) -> RowParams:
    """RowParams from scalars or per-row sequences (scalars are broadcast to ``batch`` rows)."""
    if batch is None:
        batch = next(len(v) for v in (temperature, top_k, top_p) if not isinstance(v, (int, float)))

    def column(value, dtype):
        t = torch.as_tensor(value, dtype=dtype)
        return t.expand(batch).clone() if t.dim() == 0 else t

    temperature, top_k, top_p = column(temperature, torch.float32), column(top_k, torch.int64), column(top_p, torch.float32)
    return RowParams(temperature=temperature, top_k=top_k, top_p=top_p,
                     any_filter=bool(((top_k > 0) | (top_p < 1)).any()),
                     any_greedy=bool((temperature == 0).any()), any_random=bool((temperature > 0).any()))


def draws(batch: int, offset: int = 0) -> torch.Tensor:
    """``batch`` uniforms from ``rng.uniforms`` with distinct keys (splitmix64 is a bijection)."""
    keys = rng.splitmix64(np.arange(batch, dtype=np.uint64) + np.uint64(offset * batch))
    return torch.from_numpy(rng.uniforms(keys, np.zeros(batch, dtype=np.int64)))


def reference_keep(row: torch.Tensor, top_k: int, top_p: float) -> tuple[set[int], float]:
    """Kept token ids by a plain loop in float64, and the closest the cumulative mass came to top_p."""
    row = row.double()
    order = torch.argsort(row, descending=True).tolist()
    k = len(order) if top_k <= 0 else min(top_k, len(order))
    top = order[:k]
    probs = torch.softmax(row[top], dim=0).tolist()
    kept, mass, gap = set(), 0.0, math.inf
    for token, prob in zip(top, probs):
        kept.add(token)
        mass += prob
        if top_p < 1:
            gap = min(gap, abs(mass - top_p))
            if mass >= top_p:
                break
    return kept, gap


def empirical_check(tokens: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, float]:
    """(total variation distance, chi-square p-value) of sampled ``tokens`` against ``expected_probs``."""
    vocab = expected_probs.numel()
    counts = torch.bincount(tokens, minlength=vocab).double().numpy()
    p = expected_probs.double().numpy()
    tvd = 0.5 * float(np.abs(counts / counts.sum() - p).sum())
    return tvd, goodness_of_fit(counts, p * counts.sum())


# ---------------------------------------------------------------------------------------------- logprobs

def test_processed_logprobs_temperature_mixed_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g) * 3
    temps = [0.3, 0.7, 1.0, 1.5, 3.0, 0.0]
    out = processed_logprobs(logits, row_params(temps))
    assert out.dtype == torch.float32 and out.shape == logits.shape
    for i, t in enumerate(temps):
        want = torch.log_softmax(logits[i] / (t if t > 0 else 1.0), dim=-1)
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)
    # A greedy-only batch reports the unscaled distribution too.
    torch.testing.assert_close(processed_logprobs(logits, row_params(0.0, batch=6)),
                               torch.log_softmax(logits, dim=-1), atol=1e-5, rtol=1e-5)


def test_processed_logprobs_accepts_half_precision():
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = processed_logprobs(logits, row_params([0.5, 1.0, 0.0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.log_softmax(logits[0].float() / 0.5, -1))


# ---------------------------------------------------------------------------------------------- filters

@pytest.mark.parametrize("vocab", [10, 64])
def test_top_k_keeps_exactly_the_k_largest(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g)
    assert all(row.unique().numel() == vocab for row in logits)  # no ties
    for k in (1, 5, vocab - 1):
        out = filter_top_k_top_p(logits, torch.full((4,), k), torch.ones(4))
        for row_in, row_out in zip(logits, out):
            kept = torch.isfinite(row_out)
            assert set(kept.nonzero().flatten().tolist()) == set(row_in.topk(k).indices.tolist())
            assert torch.equal(row_out[kept], row_in[kept])  # kept logits are unchanged
            assert torch.isneginf(row_out[~kept]).all()


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_keeps_smallest_nucleus(top_p):
    g = torch.Generator().manual_seed(int(top_p * 100))
    logits = torch.randn(32, 50, generator=g) * 2
    out = filter_top_k_top_p(logits, torch.zeros(32, dtype=torch.int64), torch.full((32,), top_p))
    checked = 0
    for row_in, row_out in zip(logits, out):
        want, gap = reference_keep(row_in, 0, top_p)
        if gap < 1e-5:  # float32 rounding may legitimately decide a near-tie at the boundary
            continue
        checked += 1
        assert set(torch.isfinite(row_out).nonzero().flatten().tolist()) == want
        assert torch.softmax(row_in.double(), 0)[sorted(want)].sum() >= top_p
    assert checked >= 30


def test_rows_without_filter_are_untouched():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 30, generator=g)
    logits[1, 4] = float("-inf")
    top_k = torch.tensor([0, 0, 3, 0, 0, 7])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6, 1.0, 0.8])
    out = filter_top_k_top_p(logits, top_k, top_p)
    for i in (0, 1, 4):
        assert torch.equal(out[i], logits[i])
    for i in (2, 3, 5):
        assert torch.isneginf(out[i]).any()


def test_top_k_is_applied_before_top_p():
    # p = [0.4, 0.3, 0.2, 0.1]. top-k 2 renormalises to [4/7, 3/7], and 4/7 >= 0.5 already, so only
    # token 0 survives. Top-p first would keep {0, 1} (0.4 < 0.5).
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = filter_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_combined_top_k_top_p_matches_reference():
    g = torch.Generator().manual_seed(4)
    batch, vocab = 64, 40
    logits = torch.randn(batch, vocab, generator=g) * 2
    top_k = torch.randint(0, vocab + 5, (batch,), generator=g)  # includes k > vocab (clamped)
    top_p = torch.rand(batch, generator=g) * 0.9 + 0.1
    top_p[::4] = 1.0
    out = filter_top_k_top_p(logits, top_k, top_p)
    checked = 0
    for i in range(batch):
        want, gap = reference_keep(logits[i], int(top_k[i]), float(top_p[i]))
        if gap < 1e-5:
            continue
        checked += 1
        assert set(torch.isfinite(out[i]).nonzero().flatten().tolist()) == want, i
    assert checked >= 60


# ---------------------------------------------------------------------------------------------- sampling

def test_greedy_rows_take_argmax():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 33, generator=g)
    u = draws(8)
    tokens, logprobs = sample(logits, u, row_params(0.0, batch=8))  # all-greedy path
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    mixed = row_params([0.0, 1.0] * 4)
    tokens = sample_tokens(processed_logprobs(logits, mixed), u, mixed)
    assert torch.equal(tokens[0::2], logits[0::2].argmax(-1))


FILTERS = [(0, 1.0), (5, 1.0), (0, 0.9), (8, 0.8)]


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("top_k,top_p", FILTERS)
@pytest.mark.parametrize("vocab", [20, 32])
def test_empirical_distribution_matches(vocab, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(vocab * 1000 + top_k * 10 + int(temperature * 10))
    logits = torch.randn(vocab, generator=g) * 1.5
    expected = processed_logprobs(logits[None], row_params(temperature, top_k, top_p, batch=1))[0].exp()
    # The processed distribution itself: softmax(logits / T) on the reference support, renormalised.
    kept, gap = reference_keep(logits / temperature, top_k, top_p)
    assert gap > 1e-5
    support = torch.zeros(vocab, dtype=torch.bool)
    support[sorted(kept)] = True
    reference = torch.softmax((logits.double() / temperature).masked_fill(~support, float("-inf")), -1)
    torch.testing.assert_close(expected.double(), reference, atol=1e-6, rtol=1e-5)
    params = row_params(temperature, top_k, top_p, batch=N_DRAWS)
    tokens, logprobs = sample(logits.expand(N_DRAWS, vocab), draws(N_DRAWS, offset=vocab), params)
    assert torch.isfinite(logprobs).all()
    assert (torch.bincount(tokens, minlength=vocab)[expected == 0] == 0).all()
    tvd, p_value = empirical_check(tokens, expected)
    assert tvd < TVD_LIMIT
    assert p_value > P_VALUE_LIMIT


@pytest.mark.slow
def test_negative_control_wrong_sampler_fails():
    """Sampling from softmax(logits) when T = 0.5 was asked for must fail the same checks."""
    g = torch.Generator().manual_seed(6)
    vocab = 20
    logits = torch.randn(vocab, generator=g) * 1.5
    expected = processed_logprobs(logits[None], row_params(0.5, batch=1))[0].exp()
    wrong = row_params(1.0, batch=N_DRAWS)  # ignores the temperature
    tokens, _ = sample(logits.expand(N_DRAWS, vocab), draws(N_DRAWS), wrong)
    tvd, p_value = empirical_check(tokens, expected)
    assert tvd > TVD_LIMIT
    assert p_value < P_VALUE_LIMIT


def test_samples_never_leave_the_filtered_set():
    g = torch.Generator().manual_seed(7)
    configs = [(1.0, 3, 1.0), (0.7, 0, 0.5), (1.3, 10, 0.8), (2.0, 0, 0.95), (0.5, 1, 1.0), (1.0, 40, 0.3)]
    vocab, reps = 48, 30_000
    base = torch.randn(len(configs), vocab, generator=g) * 2
    temps, ks, ps = (torch.tensor(c).repeat_interleave(reps) for c in zip(*configs))
    params = row_params(temps, ks.long(), ps)
    tokens, logprobs = sample(base.repeat_interleave(reps, 0), draws(len(temps), offset=7), params)
    assert torch.isfinite(logprobs).all()
    for i, (t, k, p) in enumerate(configs):
        allowed, _ = reference_keep(base[i] / t, k, p)
        seen = set(tokens[i * reps:(i + 1) * reps].unique().tolist())
        assert seen <= allowed, (i, seen - allowed)
        assert len(seen) == len(allowed) or len(allowed) > 10  # small sets are fully visited


def test_zero_probability_tokens_never_sampled():
    g = torch.Generator().manual_seed(8)
    vocab = 24
    logits = torch.randn(vocab, generator=g)
    banned = torch.tensor([0, 1, 5, 11, 22, 23])  # includes both ends of the vocabulary
    logits[banned] = float("-inf")
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 4, 0.9)]:
        params = row_params(temperature, top_k, top_p, batch=N_DRAWS)
        tokens, logprobs = sample(logits.expand(N_DRAWS, vocab), draws(N_DRAWS, offset=8), params)
        assert not torch.isin(tokens, banned).any()
        assert torch.isfinite(logprobs).all()
    # The extreme uniforms rng.uniforms can produce (and 1.0 itself) stay inside the support.
    edge = torch.tensor([2.0 ** -54, 1e-300, 1 - 2.0 ** -53, 1.0], dtype=torch.float64)
    tokens, logprobs = sample(logits.expand(4, vocab), edge, row_params(1.0, batch=4))
    assert not torch.isin(tokens, banned).any() and torch.isfinite(logprobs).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 5, 0.9), (0.0, 3, 0.5)])
def test_nan_logits_give_nan_logprob(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(9)
    vocab = 30
    logits = torch.randn(4, vocab, generator=g)
    logits[1, 7] = float("nan")
    logits[3] = float("nan")
    params = row_params([1.0, temperature, 0.7, temperature], [0, top_k, 2, top_k], [1.0, top_p, 1.0, top_p])
    tokens, logprobs = sample(logits, draws(4, offset=9), params)
    assert torch.isnan(logprobs[[1, 3]]).all()
    assert torch.isfinite(logprobs[[0, 2]]).all()
    assert ((tokens >= 0) & (tokens < vocab)).all()


@pytest.mark.parametrize("vocab", [8193, 49152, 151936])
def test_large_odd_vocab_sizes(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g) * 4
    params = row_params([0.7, 1.0, 0.0, 1.3, 1.0], [0, 50, 20, 0, vocab - 1], [0.9, 1.0, 0.95, 0.5, 1.0])
    tokens, logprobs = sample(logits, draws(5, offset=vocab), params)
    assert tokens.shape == (5,) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < vocab)).all()
    assert torch.isfinite(logprobs).all() and (logprobs <= 0).all()
    assert tokens[2] == logits[2].argmax()
    assert tokens[1] in logits[1].topk(50).indices


def test_greedy_rows_ignore_filters_in_reported_logprobs():
    """Greedy rows report logprobs under softmax(logits) even when top-k/top-p are set."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    params = RowParams(temperature=torch.tensor([0.0, 1.0]), top_k=torch.tensor([2, 2]),
                       top_p=torch.tensor([1.0, 1.0]), any_filter=True, any_greedy=True, any_random=True)
    logprobs = processed_logprobs(logits, params)
    assert torch.allclose(logprobs[0], torch.log_softmax(logits[0], -1))
    assert logprobs[1, 2] == float("-inf")  # the sampled row is filtered
