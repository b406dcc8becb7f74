"""`respec audit` passes on a correct speculative engine and fails on a deliberately broken one."""

from __future__ import annotations

import pytest
import torch

from respec import LLM, SamplingParams
from respec.bench.audit import always_accept, chi_square_p_value, p_value, run_audit

PROMPTS = [[5, 17, 33, 40], [7, 8, 9], [60, 61, 62, 63, 64]]
PARAMS = SamplingParams(temperature=0.9, top_k=40, seed=1)


@pytest.fixture(scope="module")
def speculative_llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), device="cpu", drafter="self:1", speculative=4, max_num_seqs=512)


@pytest.mark.slow
def test_audit_passes_on_the_real_sampler(speculative_llm):
    checks = run_audit(speculative_llm, PROMPTS, PARAMS, samples=3000, max_new_tokens=24)
    assert [c.name for c in checks] == ["distribution", "greedy", "logprobs",
                                        "negative control (always-accept must fail)"]
    assert all(c.passed for c in checks), [c.figure for c in checks]
    # The drafter must be imperfect for the check to mean anything.
    assert 0.05 < speculative_llm.stats.spec.accept_rate < 0.95


@pytest.mark.slow
def test_audit_fails_on_an_always_accept_sampler(speculative_llm):
    with always_accept(speculative_llm):
        checks = run_audit(speculative_llm, PROMPTS, PARAMS, samples=3000, max_new_tokens=24)
    distribution = next(c for c in checks if c.name == "distribution")
    assert not distribution.passed, distribution.figure


def test_audit_refuses_greedy_and_non_speculative(speculative_llm, tiny_llama):
    with pytest.raises(ValueError, match="temperature"):
        run_audit(speculative_llm, PROMPTS, SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="drafter"):
        run_audit(LLM(str(tiny_llama), device="cpu"), PROMPTS, PARAMS)


def test_chi_square_pools_small_cells_and_flags_impossible_samples():
    expected = torch.tensor([50.0, 30.0, 2.0, 1.0, 0.0])
    # The cells expecting 2 and 1 pool with the next-smallest (30) so the pool expects >= 5.
    chi2, dof = chi_square_p_value(torch.tensor([50.0, 30.0, 2.0, 1.0, 0.0]), expected)
    assert chi2 == 0 and dof == 1 and p_value(chi2, dof) == 1.0
    chi2, dof = chi_square_p_value(torch.tensor([50.0, 31.0, 0.0, 0.0, 0.0]), torch.tensor([50.0, 20.0, 6.0, 5.0, 0.0]))
    # The cell expecting 5 is a pool on its own; 6, 20 and 50 stay cells.
    assert chi2 == pytest.approx(6 + 11**2 / 20 + 5) and dof == 3
    chi2, _ = chi_square_p_value(torch.tensor([50.0, 30.0, 2.0, 0.0, 1.0]), expected)
    assert chi2 == float("inf") and p_value(chi2, 1) == 0.0


@pytest.mark.slow
def test_chi_square_is_calibrated_on_peaked_distributions_with_small_groups():
    """Under the null, the audit statistic (summed over many small groups of a peaked distribution, as
    an LLM's next-token law is) rejects at about its nominal rate. Pooling only the cells expecting < 5
    leaves pools expecting ~0.01 whose one chance hit adds ~100: that rejects 8% of audits at 0.01."""
    g = torch.Generator().manual_seed(0)
    p_values = []
    for _ in range(200):
        chi2_total, dof_total = 0.0, 0
        for _ in range(48):
            logits = torch.randn(200, generator=g, dtype=torch.float64) * 2
            logits[:2] += torch.rand(2, generator=g, dtype=torch.float64) * 18
            probs = logits.softmax(0)
            count = int(torch.randint(10, 200, (1,), generator=g))
            draws = torch.multinomial(probs, count, replacement=True, generator=g)
            chi2, dof = chi_square_p_value(torch.bincount(draws, minlength=200).double(), probs * count)
            chi2_total, dof_total = chi2_total + chi2, dof_total + dof
        p_values.append(p_value(chi2_total, dof_total))
    assert (torch.tensor(p_values) < 0.01).double().mean() <= 0.03


def test_an_audit_on_too_few_samples_fails_and_says_how_many_it_needs(speculative_llm):
    """8 samples pool into almost no degrees of freedom: the distribution check cannot pass on that, and
    the always-accept control, undetected, fails the audit with a sample count that would detect it."""
    checks = {c.name.split(" ")[0]: c for c in run_audit(speculative_llm, PROMPTS, PARAMS, samples=8,
                                                         max_new_tokens=8)}
    assert not checks["distribution"].passed and "too little evidence" in checks["distribution"].figure
    control = checks["negative"]
    assert not control.passed and "not detected" in control.figure


@pytest.mark.parametrize("samples", [0, -3])
def test_a_sample_count_below_one_is_refused(speculative_llm, samples):
    with pytest.raises(ValueError, match="^samples: "):
        run_audit(speculative_llm, PROMPTS, PARAMS, samples=samples)


def test_samples_needed_grows_as_the_measured_bias_shrinks():
    from respec.bench.audit import critical_value, samples_needed

    assert critical_value(24) == pytest.approx(51.18, abs=0.01)  # chi-square tables, p = 0.001
    assert samples_needed(1000, chi2=30.0, dof=10) > samples_needed(1000, chi2=300.0, dof=10) > 1000 / 30
    assert samples_needed(1000, chi2=8.0, dof=10) is None  # no bias measured: nothing to extrapolate
