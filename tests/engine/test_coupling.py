"""Deterministic drafts are verified by coupling with plain decoding: the samples are AR's, token for token.

Whatever drafts the n-gram drafter offers (its history of earlier rollouts, its siblings), whatever arm
the controller picks and whichever batch a request shares, a sampled rollout equals plain decoding of
the same seeds. That is exactness in its strongest form, and what lets a rollout not depend on the
worker that served it.
"""

from __future__ import annotations

import pytest
import torch

from respec import LLM
from respec.engine.speculation import ControllerConfig
from respec.engine import verify
from respec.engine.params import SamplingParams

PROMPTS = [[1, 5 + i, 7, 9 + i % 3] for i in range(6)]


def params(temperature: float = 1.0, top_p: float = 1.0, seed: int = 40) -> list[SamplingParams]:
    return [SamplingParams(n=3, temperature=temperature, top_p=top_p, max_new_tokens=24, seed=seed + i)
            for i in range(len(PROMPTS))]


def tokens(outputs) -> list[list[int]]:
    return [s.token_ids for o in outputs for s in o.samples]


@pytest.fixture(scope="module")
def ar(target_llm):
    return tokens(target_llm.generate(PROMPTS, params(), progress=False))


@pytest.mark.parametrize("speculative", [1, 3, "adaptive"])
def test_ngram_rollouts_equal_plain_decoding_in_any_batch(target_llm, ar, speculative):
    if speculative == "adaptive":  # arms picked step by step from measured times; off excluded so it drafts
        speculative = ControllerConfig(max_draft_tokens=3, allow_off=False, seed=0)
    llm = LLM(target_llm.model, tokenizer=target_llm.tokenizer, drafter="ngram", speculative=speculative)
    # History of other samples of the same prompts: drafts that are sometimes right, sometimes wrong.
    llm.generate(PROMPTS, params(seed=900), progress=False)
    together = tokens(llm.generate(PROMPTS, params(), progress=False))
    # Again, one request at a time: the drafter now has history, and each batch is one group.
    alone = [t for p, q in zip(PROMPTS, params()) for t in tokens(llm.generate([p], [q], progress=False))]
    assert together == ar and alone == ar
    spec = llm.stats.spec
    assert spec.drafted > spec.accepted > 0  # drafts were offered, some accepted, some rejected


def test_filtered_sampling_is_coupled_too(target_llm):
    plain = tokens(target_llm.generate(PROMPTS, params(0.7, 0.9), progress=False))
    llm = LLM(target_llm.model, tokenizer=target_llm.tokenizer, drafter="ngram", speculative=2)
    assert tokens(llm.generate(PROMPTS, params(0.7, 0.9), progress=False)) == plain


def test_a_coupling_with_other_uniforms_is_caught(target_llm, ar, monkeypatch):
    """Negative control: draws from uniforms other than plain decoding's break the equality."""
    real = verify.target_draws
    monkeypatch.setattr(verify, "target_draws", lambda logprobs, u: real(logprobs, 1.0 - u))
    llm = LLM(target_llm.model, tokenizer=target_llm.tokenizer, drafter="ngram", speculative=2)
    assert tokens(llm.generate(PROMPTS, params(), progress=False)) != ar


def test_the_coupled_acceptance_rate_is_p_of_the_draft():
    """Draft x is accepted with probability p(x), as min(1, p/q) gives for a one-hot q."""
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, generator=generator), dim=-1)
    n = 200_000
    target = p.log()[None, None, :].expand(n, 2, 5)
    drafts = torch.full((n, 1), 2)
    uniforms = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    verdict = verify.verify_drafts(target, drafts, None, torch.rand(n, 1, dtype=torch.float64), uniforms,
                                   torch.zeros(n, dtype=torch.bool))
    rate = verdict.num_accepted.double().mean().item()
    assert abs(rate - p[2].item()) < 4 * (p[2].item() * (1 - p[2].item()) / n) ** 0.5
    emitted = verdict.tokens[torch.arange(n), 0]  # the first token is always distributed as p
    assert torch.allclose(torch.bincount(emitted, minlength=5).double() / n, p.double(), atol=0.005)


@pytest.mark.parametrize("accept", [0.0, 0.5, 1.0])
def test_the_cpu_chain_position_by_position_equals_the_gpu_chain_at_all_positions(accept):
    """The CPU draws position i only for rows still accepting; the GPU path draws every position at
    once. Same uniforms, same float64 draws: the same accepted counts and next tokens, greedy rows and
    shorter offers included."""
    generator = torch.Generator().manual_seed(1)
    batch, k, vocab = 64, 4, 50
    target = torch.log_softmax(torch.randn(batch, k + 1, vocab, generator=generator) * 2, dim=-1)
    uniforms = torch.rand(batch, k + 1, generator=generator, dtype=torch.float64)
    own = verify.target_draws(target, uniforms)[:, :k]
    hit = torch.rand(batch, k, generator=generator) < accept
    drafts = torch.where(hit, own, torch.randint(0, vocab, (batch, k), generator=generator))
    greedy = torch.rand(batch, generator=generator) < 0.25
    drafts[greedy] = torch.where(hit[greedy], target[greedy, :k].argmax(-1), drafts[greedy])
    offered = torch.arange(k)[None, :] < torch.randint(0, k + 1, (batch, 1), generator=generator)
    lazy = verify._coupled_chain_lazy(target, drafts, uniforms, greedy, offered)
    full = verify._coupled_chain(target, drafts, uniforms, greedy, offered)
    assert torch.equal(lazy[0], full[0]) and torch.equal(lazy[1], full[1])
    if accept == 1.0:
        assert torch.equal(lazy[0], offered.sum(1))  # every offered draft was the target's own draw
