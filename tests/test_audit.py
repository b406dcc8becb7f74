"""`respec audit` passes on a correct speculative engine and fails on a deliberately broken one."""

from __future__ import annotations

import pytest
import torch

from respec import LLM, SamplingParams
from respec.audit import always_accept, chi_square_p_value, p_value, run_audit

PROMPTS = [[5, 17, 33, 40], [7, 8, 9], [60, 61, 62, 63, 64]]
PARAMS = SamplingParams(temperature=0.9, top_k=40, seed=1)


@pytest.fixture(scope="module")
def speculative_llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), device="cpu", drafter="self:1", speculative=4, max_num_seqs=512)


def test_audit_passes_on_the_real_sampler(speculative_llm):
    checks = run_audit(speculative_llm, PROMPTS, PARAMS, samples=3000, max_new_tokens=24)
    assert [c.name for c in checks] == ["distribution", "greedy", "logprobs"]
    assert all(c.passed for c in checks), [c.figure for c in checks]
    # The drafter must be imperfect for the check to mean anything.
    assert 0.05 < speculative_llm.stats.spec.accept_rate < 0.95


def test_audit_fails_on_an_always_accept_sampler(speculative_llm):
    with always_accept():
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
    chi2, dof = chi_square_p_value(torch.tensor([50.0, 30.0, 2.0, 1.0, 0.0]), expected)
    assert chi2 == 0 and dof == 2 and p_value(chi2, dof) == 1.0
    chi2, _ = chi_square_p_value(torch.tensor([50.0, 30.0, 2.0, 0.0, 1.0]), expected)
    assert chi2 == float("inf") and p_value(chi2, 1) == 0.0
