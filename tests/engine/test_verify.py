"""Speculative chain verification (``respec.engine.verify``): section A of shared/TESTING.md.

The property under test: whatever the drafter proposes, every token a row emits is distributed exactly
as the target's processed sampling distribution. A1 checks the maths exactly (no sampling); A2, A3 and
the ``draft_lens`` test check the sampler empirically; A4 proves those empirical tests can fail; A5-A8
cover greedy rows, masking, edge inputs and seeding. All uniforms come from seeded generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from respec.engine import verify
from respec.engine.sampling import (
    RowParams,
    inverse_cdf,
    processed_logprobs,
    processed_logprobs_steps,
)
from respec.engine.verify import verify_drafts
from tests.helpers import goodness_of_fit

N_DRAWS = 200_000
TVD_LIMIT = 0.01
P_VALUE_LIMIT = 1e-4
CHAIN_DRAWS = 1_000_000
CHAIN_TVD_LIMIT = 0.02
IDENTITY_ATOL = 1e-12
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------- helpers

def row_params(temperature, top_k=0, top_p=1.0, batch: int = 1) -> RowParams:
    """RowParams with the same scalar settings on ``batch`` rows (as in tests/test_sampling.py)."""
    temperature = torch.full((batch,), float(temperature))
    top_k = torch.full((batch,), int(top_k), dtype=torch.int64)
    top_p = torch.full((batch,), float(top_p))
    return RowParams(temperature=temperature, top_k=top_k, top_p=top_p,
                     any_filter=bool(((top_k > 0) | (top_p < 1)).any()),
                     any_greedy=bool((temperature == 0).any()), any_random=bool((temperature > 0).any()))


def uniforms(g: torch.Generator, *shape: int) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1): multiples of 2**-53 from 1 to 2**53 - 1."""
    return torch.randint(1, 2 ** 53, shape, generator=g, dtype=torch.int64).double() * 2.0 ** -53


def draw(logprobs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One token per row of ``logprobs [N, V]`` (a drafter sampling from its processed q)."""
    return inverse_cdf(logprobs.double().exp(), uniforms(g, logprobs.shape[0]))


def draw_shared(logprobs: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` tokens from one distribution ``logprobs [V]``: ``inverse_cdf``'s rule on one shared 1-D CDF."""
    cdf = logprobs.double().exp().cumsum(0)
    return torch.searchsorted(cdf, uniforms(g, n) * cdf[-1]).clamp_(max=cdf.numel() - 1)


@dataclass
class Fit:
    tvd: float
    p_value: float
    outside: int  # samples that landed on cells of probability 0

    @property
    def passes(self) -> bool:
        return self.outside == 0 and self.tvd < TVD_LIMIT and self.p_value > P_VALUE_LIMIT


def fit(samples: torch.Tensor, probs: torch.Tensor) -> Fit:
    """TVD and chi-square p-value of ``samples`` (cell indices) against ``probs`` (any shape, flattened);
    a sample on a zero-probability cell makes the p-value exactly 0."""
    probs = probs.double().flatten()
    probs = probs / probs.sum()
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    n = counts.sum()
    tvd = 0.5 * float((counts / n - probs).abs().sum())
    outside = int(counts[probs == 0].sum())
    return Fit(tvd, goodness_of_fit(counts, probs * n), outside)


def one_hot_logprobs(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """log of a one-hot distribution: 0 at ``tokens``, -inf elsewhere."""
    out = torch.full((*tokens.shape, vocab), NEG_INF, dtype=torch.float64)
    return out.scatter_(-1, tokens[..., None], 0.0)


# Negative controls (A4), installed with monkeypatch on the verify module. Each reproduces a real bug
# from the table in TESTING.md; the empirical tests must reject every one of them.

def _always_accept(target_logprobs, draft_tokens, *_):
    return torch.ones(draft_tokens.shape, dtype=torch.bool)


def _residual_from_p(original):
    def next_token(p_lp, draft_tokens, draft_lp, position, rejected, u, greedy):
        return original(p_lp, draft_tokens, draft_lp, position, torch.zeros_like(rejected), u, greedy)
    return next_token


def _residual_from_q(original):
    def next_token(p_lp, draft_tokens, draft_lp, position, rejected, u, greedy):
        rows = torch.arange(draft_tokens.shape[0])
        at = position.clamp(max=draft_tokens.shape[1] - 1)
        q_lp = (draft_lp[rows, at].double() if draft_lp is not None
                else one_hot_logprobs(draft_tokens[rows, at], p_lp.shape[-1]))
        drawn_from = torch.where(rejected[:, None], q_lp, p_lp.double())
        return original(drawn_from, draft_tokens, draft_lp, position, torch.zeros_like(rejected), u, greedy)
    return next_token


CONTROLS = ["always_accept", "tiny_accept_uniform", "residual_from_p", "residual_from_q"]


def install_control(monkeypatch, control: str) -> bool:
    """Install a broken sampler; returns True when the accept uniforms should be replaced by 1e-300."""
    if control == "always_accept":
        monkeypatch.setattr(verify, "_accept_mask", _always_accept)
    elif control == "residual_from_p":
        monkeypatch.setattr(verify, "_next_token", _residual_from_p(verify._next_token))
    elif control == "residual_from_q":
        monkeypatch.setattr(verify, "_next_token", _residual_from_q(verify._next_token))
    return control == "tiny_accept_uniform"  # vllm-ascend PR #13766: the uniform hard-coded to ~0


# ---------------------------------------------------------------------------------------------- A1 identity

def random_pairs(kind: str, n: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (p, q) pairs [n, V] float64 of the given kind."""
    def dense():
        return torch.softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2, -1)

    def sparse():
        w = dense() * (torch.rand(n, vocab, generator=g) < 0.5)
        w[torch.arange(n), torch.randint(vocab, (n,), generator=g)] += 0.1  # at least one cell of mass
        return w / w.sum(-1, keepdim=True)

    def one_hot():
        return torch.eye(vocab, dtype=torch.float64)[torch.randint(vocab, (n,), generator=g)]

    if kind == "dense":
        return dense(), dense()
    if kind == "sparse":
        return sparse(), sparse()
    if kind == "q_one_hot":
        return sparse(), one_hot()
    if kind == "p_one_hot":
        return one_hot(), sparse()
    if kind == "both_one_hot":
        return one_hot(), one_hot()
    if kind == "disjoint":
        order = torch.argsort(torch.rand(n, vocab, generator=g), -1)
        split = torch.randint(1, vocab, (n, 1), generator=g)
        in_p = torch.zeros(n, vocab, dtype=torch.bool).scatter_(-1, order, torch.arange(vocab) < split)
        base = dense()
        p, q = base * in_p, dense() * ~in_p
        return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if kind == "equal":
        p = sparse()
        return p, p.clone()
    raise ValueError(kind)


PAIR_KINDS = ["dense", "sparse", "q_one_hot", "p_one_hot", "both_one_hot", "disjoint", "equal"]


def all_pairs(vocab: int, seed: int, total: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    per_kind = -(-total // len(PAIR_KINDS))
    pairs = [random_pairs(kind, per_kind, vocab, g) for kind in PAIR_KINDS]
    return torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs])


def module_acceptance(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """min(1, p(x)/q(x)) per row, after checking that ``verify_drafts`` accepts exactly when u is below it.

    Acceptance is a threshold in u, so P(accept) is that threshold. Calling the public function with u
    just below (relative 1e-12) and just above it pins the module's acceptance probability to
    min(1, p/q) far tighter than the identity's tolerance.
    """
    n = p.shape[0]
    rows = torch.arange(n)
    p_x, q_x = p[rows, draft], q[rows, draft]
    # q(x) = 0 reads as ratio +inf (accept) unless p(x) = 0 too: a token p forbids is never accepted.
    ratio = torch.where(q_x > 0, p_x / q_x, torch.full_like(p_x, math.inf)).clamp(max=1.0)
    ratio = torch.where(p_x > 0, ratio, torch.zeros_like(ratio))
    target = torch.stack((p, p), 1).log()  # position 2 is only the bonus distribution, irrelevant here
    draft_lp = q.log()[:, None] if stochastic else None
    below = torch.where(ratio >= 1, 1 - 2.0 ** -53, ratio * (1 - 1e-12))
    above = torch.where(ratio >= 1, 1 - 2.0 ** -53, ratio * (1 + 1e-12))
    below = torch.where(ratio == 0, torch.full_like(ratio, 1e-300), below)  # p(x) = 0: even a tiny u rejects
    greedy = torch.zeros(n, dtype=torch.bool)
    resample = torch.full((n,), 0.5, dtype=torch.float64)
    lo = verify_drafts(target, draft[:, None], draft_lp, below[:, None], resample, greedy).num_accepted
    hi = verify_drafts(target, draft[:, None], draft_lp, above[:, None], resample, greedy).num_accepted
    assert torch.equal(lo, (ratio > 0).long()), "accept must hold for u just below min(1, p/q)"
    assert torch.equal(hi, (ratio >= 1).long()), "accept must fail for u just above p/q < 1"
    return ratio


def module_residual(monkeypatch, p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                    stochastic: bool) -> torch.Tensor:
    """The distribution ``_next_token`` draws from after a rejection, read off the weights it samples with."""
    seen = []

    def spy(weights, u):
        seen.append(weights.clone())
        return inverse_cdf(weights, u)

    monkeypatch.setattr(verify, "inverse_cdf", spy)
    n = p.shape[0]
    verify._next_token(p.log(), draft[:, None], q.log()[:, None] if stochastic else None,
                       torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.bool),
                       torch.full((n,), 0.5, dtype=torch.float64), torch.zeros(n, dtype=torch.bool))
    monkeypatch.undo()
    (weights,) = seen
    assert (weights >= 0).all() and torch.isfinite(weights).all()
    return weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("vocab", [2, 8, 50])
def test_identity_stochastic_drafts(monkeypatch, vocab):
    """q·min(1,p/q) + (1 − Σ q·min(1,p/q))·residual == p, with acceptance and residual taken from the module."""
    p, q = all_pairs(vocab, seed=vocab)
    n = p.shape[0]
    # Acceptance of every token x (rows = pairs × x); x with q(x) = 0 is never proposed but must not crash.
    x = torch.arange(vocab).repeat(n)
    accept = module_acceptance(p.repeat_interleave(vocab, 0), q.repeat_interleave(vocab, 0), x, True).view(n, vocab)
    residual = module_residual(monkeypatch, p, q, torch.zeros(n, dtype=torch.int64), True)
    accepted_mass = q * accept
    emitted = accepted_mass + (1 - accepted_mass.sum(-1, keepdim=True)) * residual
    torch.testing.assert_close(emitted, p, atol=IDENTITY_ATOL, rtol=0)
    # Where rejection is possible the residual is the textbook one (elsewhere its weight is 0).
    mass = (p - q).clamp(min=0).sum(-1, keepdim=True)
    textbook = (p - q).clamp(min=0) / mass.clamp(min=1e-300)
    torch.testing.assert_close(residual[mass[:, 0] > 0], textbook[mass[:, 0] > 0], atol=IDENTITY_ATOL, rtol=0)


@pytest.mark.parametrize("vocab", [2, 8, 50])
def test_identity_deterministic_drafts(monkeypatch, vocab):
    """Deterministic draft x (q one-hot, draft_logprobs None): p(x)·δ_x + (1 − p(x))·residual_x == p for every x."""
    p, _ = all_pairs(vocab, seed=100 + vocab)
    n = p.shape[0]
    x = torch.arange(vocab).repeat(n)
    p_rows = p.repeat_interleave(vocab, 0)
    q_rows = torch.eye(vocab, dtype=torch.float64)[x]
    accept = module_acceptance(p_rows, q_rows, x, False)
    torch.testing.assert_close(accept, p_rows[torch.arange(n * vocab), x], atol=0, rtol=0)
    residual = module_residual(monkeypatch, p_rows, q_rows, x, False)
    emitted = accept[:, None] * q_rows + (1 - accept[:, None]) * residual
    torch.testing.assert_close(emitted, p_rows, atol=IDENTITY_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- A2 first token

FILTERS = [(0, 1.0), (5, 1.0), (0, 0.9), (8, 0.8)]
DRAFTERS = ["sampled", "argmax", "fixed"]


def first_token_case(vocab: int, temperature: float, top_k: int, top_p: float, seed: int, scale: float = 1.5,
                     drafter_noise: float | None = None, peak: float = 0.0):
    """Processed target p (positions 1 and 2) and drafter q (position 1) for one context, same RowParams.

    ``drafter_noise`` None gives an independent drafter, else a noisy copy of the target; ``peak`` raises
    the target's top logit at position 1 (a confident target, so a good drafter is often accepted).
    """
    g = torch.Generator().manual_seed(seed)
    params = row_params(temperature, top_k, top_p, batch=2)
    target_logits = torch.randn(2, vocab, generator=g) * scale
    target_logits[0, target_logits[0].argmax()] += peak
    target = processed_logprobs(target_logits, params).double()  # [2, V]: p_1, p_2
    drafter_logits = (torch.randn(1, vocab, generator=g) * scale if drafter_noise is None
                      else target_logits[:1] + drafter_noise * torch.randn(1, vocab, generator=g))
    draft = processed_logprobs(drafter_logits, row_params(temperature, top_k, top_p)).double()  # [1, V]
    return target, draft, g


def draft_token(draft: torch.Tensor, drafter: str) -> int:
    """The deterministic drafters: the drafter's argmax, or always token 0 (which may lie outside p's support)."""
    return int(draft[0].argmax()) if drafter == "argmax" else 0


def run_one_step(target: torch.Tensor, draft: torch.Tensor, drafter: str, n: int, g: torch.Generator,
                 tiny_accept: bool = False):
    """One k=1 verify step over ``n`` rows sharing one context (inputs broadcast, not copied)."""
    vocab = target.shape[-1]
    if drafter == "sampled":
        tokens = draw_shared(draft[0], n, g)
        draft_lp = draft[None].expand(n, 1, vocab)
    else:
        tokens = torch.full((n,), draft_token(draft, drafter), dtype=torch.int64)
        draft_lp = None
    accept_u = torch.full((n, 1), 1e-300, dtype=torch.float64) if tiny_accept else uniforms(g, n, 1)
    return verify_drafts(target[None].expand(n, 2, vocab), tokens[:, None], draft_lp, accept_u, uniforms(g, n),
                         torch.zeros(n, dtype=torch.bool))


@pytest.mark.slow
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("top_k,top_p", FILTERS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_first_token_follows_target(temperature, top_k, top_p, drafter):
    vocab = 24 if top_k else 16
    seed = int(temperature * 10) * 1000 + top_k * 10 + int(top_p * 10) + DRAFTERS.index(drafter)
    # The drafter is a noisy copy of the target, so supports overlap and both branches occur.
    target, draft, g = first_token_case(vocab, temperature, top_k, top_p, seed, drafter_noise=1.0)
    verdict = run_one_step(target, draft, drafter, N_DRAWS, g)
    result = fit(verdict.tokens[:, 0], target[0].exp())
    assert result.outside == 0
    assert result.tvd < TVD_LIMIT, result
    assert result.p_value > P_VALUE_LIMIT, result
    # Both branches were exercised (some rows accepted, some recovered from the residual) unless the
    # case rules one out: a single-token support, or a deterministic draft outside p's support.
    rate = float(verdict.num_accepted.double().mean())
    p_x = float(target[0].exp()[verdict.tokens[0, 0] if drafter == "sampled" else draft_token(draft, drafter)])
    if drafter != "sampled" and p_x == 0:
        assert rate == 0
    elif torch.isfinite(target[0]).sum() > 1:
        assert 0 < rate < 1


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["sampled", "argmax"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (8, 0.8)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_bonus_token_follows_target(temperature, top_k, top_p, drafter):
    """After the accepted draft (k=1) the bonus token follows p_2, whatever the drafter was."""
    vocab = 16
    target, draft, g = first_token_case(vocab, temperature, top_k, top_p, seed=77 + int(temperature * 10) + top_k,
                                        drafter_noise=0.5, peak=3.0)
    p1, q1 = target[0].exp(), draft[0].exp()
    accept_rate = float(torch.minimum(p1, q1).sum()) if drafter == "sampled" else float(p1[draft[0].argmax()])
    n = math.ceil(1.15 * N_DRAWS / accept_rate)
    verdict = run_one_step(target, draft, drafter, n, g)
    bonus = verdict.tokens[verdict.num_accepted == 1, 1]
    assert bonus.numel() >= N_DRAWS
    result = fit(bonus[:N_DRAWS], target[1].exp())
    assert result.outside == 0
    assert result.tvd < TVD_LIMIT, result
    assert result.p_value > P_VALUE_LIMIT, result


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["sampled", "fixed"])
@pytest.mark.parametrize("control", CONTROLS)
def test_negative_controls_fail_first_token_test(monkeypatch, control, drafter):
    """A4: each broken sampler must fail exactly the check test_first_token_follows_target applies."""
    target, draft, g = first_token_case(20, 1.0, 0, 1.0, seed=4242)
    tiny = install_control(monkeypatch, control)
    verdict = run_one_step(target, draft, drafter, N_DRAWS, g, tiny_accept=tiny)
    result = fit(verdict.tokens[:, 0], target[0].exp())
    assert not result.passes
    assert result.tvd > TVD_LIMIT, result
    assert result.p_value < P_VALUE_LIMIT, result


@pytest.mark.slow
def test_draft_lens_bonus_comes_from_p_not_residual():
    """A row offering fewer drafts than k, all accepted, draws its bonus from p at position draft_len."""
    g = torch.Generator().manual_seed(31)
    vocab, n = 16, N_DRAWS
    target = torch.log_softmax(torch.randn(3, vocab, generator=g, dtype=torch.float64) * 1.5, -1)
    # q_1 close to p_1 (high acceptance); q_2 far from p_2 so its residual differs clearly from p_2.
    q1 = torch.log_softmax(target[0] + 0.3 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    q2 = torch.log_softmax(-target[1] * 2, -1)
    draft = torch.stack((q1, q2))
    drafts = torch.stack((draw_shared(q1, n, g), draw_shared(q2, n, g)), 1)

    def step(lens: int):
        return verify_drafts(target[None].expand(n, 3, vocab), drafts, draft[None].expand(n, 2, vocab),
                             uniforms(g, n, 2), uniforms(g, n), torch.zeros(n, dtype=torch.bool),
                             torch.full((n,), lens, dtype=torch.int64))

    one = step(1)
    assert one.num_accepted.max() == 1
    bonus = one.tokens[one.num_accepted == 1, 1]
    assert bonus.numel() > 0.8 * n
    result = fit(bonus, target[1].exp())
    assert result.passes, result
    residual = (target[1].exp() - q2.exp()).clamp(min=0)
    assert not fit(bonus, residual).passes  # the test can tell p_2 from the residual
    none = step(0)  # nothing offered: every row emits exactly one bonus token from p_1
    assert (none.num_accepted == 0).all()
    result = fit(none.tokens[:, 0], target[0].exp())
    assert result.passes, result


# ---------------------------------------------------------------------------------------------- A3 chain

CHAIN_VOCAB, CHAIN_K = 6, 3


def chain_tables(seed: int = 5):
    """Markov target p(next | prev) and drafter q_i(next | prev) for draft slot i; row V is the prompt."""
    g = torch.Generator().manual_seed(seed)
    vocab = CHAIN_VOCAB
    params = row_params(1.2, 5, 1.0, batch=(CHAIN_K + 1) * (vocab + 1))  # top-5 of 6: zero cells on both sides
    logits = torch.randn((CHAIN_K + 1) * (vocab + 1), vocab, generator=g) * 1.5
    logprobs = processed_logprobs(logits, params).double().view(CHAIN_K + 1, vocab + 1, vocab)
    return logprobs[0], logprobs[1:]  # target [V+1, V], drafter [k, V+1, V]


def simulate_chain(n: int, seed: int, tiny_accept: bool = False) -> torch.Tensor:
    """First three emitted tokens of ``n`` rows, running verify rounds (k=3) until each row has three."""
    target_table, draft_table = chain_tables()
    draft_probs = draft_table.exp()
    g = torch.Generator().manual_seed(seed)
    emitted_so_far = torch.zeros(n, 3 + CHAIN_K + 1, dtype=torch.int64)  # room for one overshooting round
    count = torch.zeros(n, dtype=torch.int64)
    context = torch.full((n,), CHAIN_VOCAB, dtype=torch.int64)
    active = torch.arange(n)
    while active.numel():
        m = active.numel()
        # The drafter runs autoregressively on its own proposals: slot i is drawn from q_i(. | previous).
        conditioning = torch.empty(m, CHAIN_K + 1, dtype=torch.int64)  # p at slot j follows token j-1
        conditioning[:, 0] = context[active]
        for i in range(CHAIN_K):
            conditioning[:, i + 1] = inverse_cdf(draft_probs[i].index_select(0, conditioning[:, i]), uniforms(g, m))
        drafts = conditioning[:, 1:]
        slot_rows = conditioning[:, :CHAIN_K] + torch.arange(CHAIN_K) * (CHAIN_VOCAB + 1)  # rows of draft_table
        draft_lp = draft_table.reshape(-1, CHAIN_VOCAB).index_select(0, slot_rows.flatten()).view(m, CHAIN_K, -1)
        target_lp = target_table.index_select(0, conditioning.flatten()).view(m, CHAIN_K + 1, -1)
        accept_u = torch.full((m, CHAIN_K), 1e-300, dtype=torch.float64) if tiny_accept else uniforms(g, m, CHAIN_K)
        verdict = verify_drafts(target_lp, drafts, draft_lp, accept_u, uniforms(g, m),
                                torch.zeros(m, dtype=torch.bool))
        # Write all k+1 slots after the row's emitted tokens; slots past num_accepted are padding that the
        # next round overwrites (it starts exactly there), and finished rows are never written again.
        start = count[active]
        emitted_so_far[active] = emitted_so_far[active].scatter(
            1, start[:, None] + torch.arange(CHAIN_K + 1), verdict.tokens)
        context[active] = verdict.tokens[torch.arange(m), verdict.num_accepted]
        count[active] = start + verdict.num_accepted + 1
        active = active[count[active] < 3]
    return emitted_so_far[:, :3]


def chain_target_joint() -> torch.Tensor:
    target = chain_tables()[0].exp()
    first, step = target[CHAIN_VOCAB], target[:CHAIN_VOCAB]
    return first[:, None, None] * step[:, :, None] * step[None, :, :]  # p(t1) p(t2|t1) p(t3|t2)


def chain_fit(tokens: torch.Tensor) -> Fit:
    cells = tokens[:, 0] * CHAIN_VOCAB ** 2 + tokens[:, 1] * CHAIN_VOCAB + tokens[:, 2]
    return fit(cells, chain_target_joint())


@pytest.mark.slow
def test_chain_joint_of_first_three_tokens():
    """A3: later positions and bonus tokens, across rounds: joint over 216 cells matches the target chain."""
    result = chain_fit(simulate_chain(CHAIN_DRAWS, seed=11))
    assert result.outside == 0
    assert result.tvd < CHAIN_TVD_LIMIT, result
    assert result.p_value > P_VALUE_LIMIT, result


@pytest.mark.slow
@pytest.mark.parametrize("control", ["always_accept", "residual_from_p", "residual_from_q"])
def test_negative_controls_fail_chain_test(monkeypatch, control):
    tiny = install_control(monkeypatch, control)
    result = chain_fit(simulate_chain(CHAIN_DRAWS, seed=12, tiny_accept=tiny))
    assert result.tvd > CHAIN_TVD_LIMIT, result
    assert result.p_value < P_VALUE_LIMIT, result


# ---------------------------------------------------------------------------------------------- A5 greedy

def greedy_case(batch: int = 4, k: int = 3, vocab: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.log_softmax(torch.randn(batch, k + 1, vocab, generator=g, dtype=torch.float64) * 3, -1)
    return target, target.argmax(-1), g


def greedy_verify(target, drafts, draft_lens=None, draft_logprobs=None):
    batch = target.shape[0]
    return verify_drafts(target, drafts, draft_logprobs, None, None, torch.ones(batch, dtype=torch.bool), draft_lens)


def check_logprobs(verdict, target):
    torch.testing.assert_close(verdict.logprobs, target.gather(-1, verdict.tokens[..., None]).squeeze(-1),
                               atol=0, rtol=0)


def test_greedy_all_accepted_plus_bonus():
    target, best, _ = greedy_case()
    verdict = greedy_verify(target, best[:, :3].clone())
    assert verdict.num_accepted.tolist() == [3] * 4
    assert torch.equal(verdict.tokens, best)  # three drafts, then the argmax bonus at position 4
    check_logprobs(verdict, target)


def test_greedy_early_mismatch_cuts_the_chain():
    target, best, _ = greedy_case()
    drafts = best[:, :3].clone()
    drafts[:, 1] = (drafts[:, 1] + 1) % target.shape[-1]  # slot 2 wrong; slot 3 right but must not count
    verdict = greedy_verify(target, drafts)
    assert verdict.num_accepted.tolist() == [1] * 4
    assert torch.equal(verdict.tokens[:, :2], best[:, :2])  # accepted draft, then the target's correction


def test_greedy_all_rejected_emits_exactly_one_token():
    target, best, _ = greedy_case()
    drafts = (best[:, :3] + 1) % target.shape[-1]
    verdict = greedy_verify(target, drafts)
    assert verdict.num_accepted.tolist() == [0] * 4
    assert torch.equal(verdict.tokens[:, 0], best[:, 0])
    check_logprobs(verdict, target)


def test_greedy_ragged_rows():
    target, best, _ = greedy_case()
    lens = torch.tensor([3, 1, 0, 2])
    drafts = best[:, :3].clone()
    drafts[3, 0] = (drafts[3, 0] + 1) % target.shape[-1]  # row 3 also mismatches at its first slot
    verdict = greedy_verify(target, drafts, lens)
    assert verdict.num_accepted.tolist() == [3, 1, 0, 0]
    rows = torch.arange(4)
    assert torch.equal(verdict.tokens[rows, verdict.num_accepted], best[rows, verdict.num_accepted])
    assert torch.equal(verdict.tokens[0], best[0])
    assert verdict.tokens[1, 0] == best[1, 0]


@pytest.mark.parametrize("with_draft_logprobs", [False, True])
def test_greedy_empty_draft_is_bonus_only(with_draft_logprobs):
    target, best, _ = greedy_case(k=0)
    draft_lp = torch.zeros(4, 0, target.shape[-1], dtype=torch.float64) if with_draft_logprobs else None
    verdict = greedy_verify(target, torch.zeros(4, 0, dtype=torch.int64), draft_logprobs=draft_lp)
    assert verdict.tokens.shape == (4, 1)
    assert verdict.num_accepted.tolist() == [0] * 4
    assert torch.equal(verdict.tokens[:, 0], best[:, 0])
    check_logprobs(verdict, target)


def test_mixed_batch_keeps_greedy_rows_exact():
    """Greedy rows among sampled rows give what an all-greedy call (no uniforms) gives, draft logprobs or not."""
    target, best, g = greedy_case(batch=8, k=3)
    vocab = target.shape[-1]
    drafts = best[:, :3].clone()
    drafts[::3, 2] = (drafts[::3, 2] + 1) % vocab  # some rows mismatch late
    drafts[1::4, 0] = (drafts[1::4, 0] + 2) % vocab  # some early
    draft_lp = torch.log_softmax(torch.randn(8, 3, vocab, generator=g, dtype=torch.float64), -1)
    greedy = torch.tensor([True, False] * 4)
    reference = greedy_verify(target, drafts)
    for lp in (draft_lp, None):
        mixed = verify_drafts(target, drafts, lp, uniforms(g, 8, 3), uniforms(g, 8), greedy)
        assert torch.equal(mixed.num_accepted[greedy], reference.num_accepted[greedy])
        for row in greedy.nonzero().flatten().tolist():
            emitted = int(reference.num_accepted[row]) + 1
            assert torch.equal(mixed.tokens[row, :emitted], reference.tokens[row, :emitted])


def test_sampled_empty_draft_with_draft_logprobs():
    target, _, g = greedy_case(k=0)
    draft_lp = torch.zeros(4, 0, target.shape[-1], dtype=torch.float64)
    verdict = verify_drafts(target, torch.zeros(4, 0, dtype=torch.int64), draft_lp, uniforms(g, 4, 0),
                            uniforms(g, 4), torch.zeros(4, dtype=torch.bool))
    assert verdict.tokens.shape == (4, 1) and (verdict.num_accepted == 0).all()


def test_sampled_rows_require_resample_uniforms():
    target, best, g = greedy_case()
    drafts = (best[:, :3] + 1) % target.shape[-1]  # rejected at slot 1, so the recovered token is sampled
    greedy = torch.tensor([True, False, False, False])
    with pytest.raises(ValueError, match="resample_uniforms"):
        verify_drafts(target, drafts, None, uniforms(g, 4, 3), None, greedy)


@pytest.mark.slow
def test_sampled_empty_draft_is_a_draw_from_p():
    """k=0, deterministic drafter interface (no draft logprobs): the one token follows p exactly."""
    g = torch.Generator().manual_seed(3)
    target = torch.log_softmax(torch.randn(1, 1, 10, generator=g, dtype=torch.float64), -1)
    verdict = verify_drafts(target.expand(N_DRAWS, 1, 10), torch.zeros(N_DRAWS, 0, dtype=torch.int64), None,
                            uniforms(g, N_DRAWS, 0), uniforms(g, N_DRAWS), torch.zeros(N_DRAWS, dtype=torch.bool))
    assert verdict.tokens.shape == (N_DRAWS, 1)
    assert fit(verdict.tokens[:, 0], target[0, 0].exp()).passes


# ---------------------------------------------------------------------------------------------- A6 masking

@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (31, 1.0), (0, 0.5), (0, 0.9), (0, 0.99)])
@pytest.mark.parametrize("drafter", ["sampled", "argmax", "random"])
def test_no_token_outside_the_allowed_set(top_k, top_p, drafter):
    """Accepted, recovered and bonus tokens all lie where the processed target logprob is finite."""
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100) + len(drafter))
    n, k, vocab = 4_000, 3, 32
    params = row_params(1.0, top_k, top_p, batch=n)
    target = processed_logprobs_steps(torch.randn(n, k + 1, vocab, generator=g) * 2, params)  # float32
    draft_lp = processed_logprobs_steps(torch.randn(n, k, vocab, generator=g) * 2, params)
    if drafter == "sampled":
        drafts = torch.stack([draw(draft_lp[:, i], g) for i in range(k)], 1)
    elif drafter == "argmax":  # deterministic: often a token outside the target's allowed set
        drafts, draft_lp = draft_lp.argmax(-1), None
    else:  # a broken drafter proposing tokens it gave no mass (q(x) = 0, and often p(x) = 0)
        drafts = torch.randint(vocab, (n, k), generator=g)
    verdict = verify_drafts(target, drafts, draft_lp, uniforms(g, n, k), uniforms(g, n),
                            torch.zeros(n, dtype=torch.bool))
    emitted = torch.arange(k + 1)[None] <= verdict.num_accepted[:, None]
    allowed = torch.isfinite(target.gather(-1, verdict.tokens[..., None]).squeeze(-1))
    assert (allowed | ~emitted).all()
    assert torch.isfinite(verdict.logprobs[emitted]).all()
    if top_k != 1:  # with one allowed token every proposal in it is accepted; otherwise both branches occur
        assert (verdict.num_accepted < k).any()
    assert (verdict.num_accepted > 0).any() or drafter != "sampled"


# ---------------------------------------------------------------------------------------------- A7 edges

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_p_equal_q_always_accepts(dtype):
    g = torch.Generator().manual_seed(21)
    n, k, vocab = 2000, 4, 10
    target = torch.log_softmax(torch.randn(n, k + 1, vocab, generator=g, dtype=torch.float64), -1).to(dtype)
    draft_lp = target[:, :k].clone()
    drafts = torch.stack([draw(draft_lp[:, i], g) for i in range(k)], 1)
    accept_u = uniforms(g, n, k)
    accept_u[:10] = 1 - 2.0 ** -53  # the largest uniform below 1
    verdict = verify_drafts(target, drafts, draft_lp, accept_u, uniforms(g, n), torch.zeros(n, dtype=torch.bool))
    assert (verdict.num_accepted == k).all()
    assert torch.isfinite(verdict.logprobs).all()


def test_p_nearly_q_no_nan():
    """q = p perturbed by ~1e-12: near-zero residual mass must still give a valid token, never NaN."""
    g = torch.Generator().manual_seed(22)
    n, k, vocab = 4000, 2, 10
    target = torch.log_softmax(torch.randn(n, k + 1, vocab, generator=g, dtype=torch.float64), -1)
    draft_lp = torch.log_softmax(target[:, :k] + 1e-12 * torch.randn(n, k, vocab, generator=g, dtype=torch.float64),
                                 -1)
    drafts = torch.stack([draw(draft_lp[:, i], g) for i in range(k)], 1)
    accept_u = torch.full((n, k), 1 - 2.0 ** -53, dtype=torch.float64)  # reject whenever p(x) < q(x) at all
    verdict = verify_drafts(target, drafts, draft_lp, accept_u, uniforms(g, n), torch.zeros(n, dtype=torch.bool))
    assert (verdict.num_accepted < k).any() and (verdict.num_accepted > 0).any()
    assert torch.isfinite(verdict.logprobs).all()
    assert ((verdict.tokens >= 0) & (verdict.tokens < vocab)).all()


def test_proposal_with_zero_draft_mass():
    """q(x) = 0 for the proposed x: accepted when p(x) > 0 (ratio +inf), rejected when p(x) = 0 too."""
    g = torch.Generator().manual_seed(23)
    vocab, n = 8, 500
    target = torch.log_softmax(torch.randn(n, 2, vocab, generator=g, dtype=torch.float64), -1)
    target[:, :, 7] = NEG_INF  # token 7 impossible under p
    draft_lp = torch.log_softmax(torch.randn(n, 1, vocab, generator=g, dtype=torch.float64), -1)
    draft_lp[:, :, 3] = NEG_INF
    draft_lp[:, :, 7] = NEG_INF
    drafts = torch.tensor([3, 7]).repeat(n // 2)[:, None]
    verdict = verify_drafts(target, drafts, draft_lp, uniforms(g, n, 1), uniforms(g, n),
                            torch.zeros(n, dtype=torch.bool))
    assert (verdict.num_accepted[drafts[:, 0] == 3] == 1).all()
    assert (verdict.num_accepted[drafts[:, 0] == 7] == 0).all()
    assert torch.isfinite(verdict.logprobs[torch.arange(n), verdict.num_accepted]).all()


@pytest.mark.parametrize("vocab", [8193, 49152, 151936])
@pytest.mark.parametrize("stochastic", [True, False])
def test_large_odd_vocab_sizes(vocab, stochastic):
    g = torch.Generator().manual_seed(vocab)
    batch, k = 3, 2
    params = RowParams(temperature=torch.tensor([0.7, 1.0, 0.0]), top_k=torch.tensor([0, 50, 0]),
                       top_p=torch.tensor([0.9, 1.0, 1.0]), any_filter=True, any_greedy=True, any_random=True)
    target = processed_logprobs_steps(torch.randn(batch, k + 1, vocab, generator=g) * 4, params)
    draft_lp = processed_logprobs_steps(torch.randn(batch, k, vocab, generator=g) * 4, params)
    drafts = torch.stack([draw(draft_lp[:, i], g) for i in range(k)], 1)
    verdict = verify_drafts(target, drafts, draft_lp if stochastic else None, uniforms(g, batch, k),
                            uniforms(g, batch), params.temperature == 0)
    assert verdict.tokens.shape == (batch, k + 1) and verdict.tokens.dtype == torch.int64
    assert ((verdict.tokens >= 0) & (verdict.tokens < vocab)).all()
    emitted = torch.arange(k + 1)[None] <= verdict.num_accepted[:, None]
    assert torch.isfinite(verdict.logprobs[emitted]).all()
    assert verdict.tokens[2, verdict.num_accepted[2]] == target[2, verdict.num_accepted[2]].argmax()


@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_bad_target_logits_flagged_and_in_range(bad):
    """Bad target logits give a NaN logprob (the project's signal, as in sampling) and tokens stay in [0, V)."""
    g = torch.Generator().manual_seed(24)
    batch, k, vocab = 4, 2, 30
    params = RowParams(temperature=torch.tensor([1.0, 1.0, 0.0, 0.8]), top_k=torch.tensor([0, 0, 0, 5]),
                       top_p=torch.tensor([1.0, 1.0, 1.0, 0.9]), any_filter=True, any_greedy=True, any_random=True)
    logits = torch.randn(batch, k + 1, vocab, generator=g)
    for row in (1, 2, 3):  # a sampled, a greedy and a filtered row, bad at the first position
        if bad == "nan":
            logits[row, 0, 7] = float("nan")
        elif bad == "+inf":
            logits[row, 0, 7] = float("inf")
        else:
            logits[row, 0] = NEG_INF
    target = processed_logprobs_steps(logits, params)
    draft_lp = processed_logprobs_steps(torch.randn(batch, k, vocab, generator=g), params)
    drafts = torch.stack([draw(draft_lp[:, i], g) for i in range(k)], 1)
    for lp in (draft_lp, None):
        verdict = verify_drafts(target, drafts, lp, uniforms(g, batch, k), uniforms(g, batch),
                                params.temperature == 0)
        assert ((verdict.tokens >= 0) & (verdict.tokens < vocab)).all()
        assert torch.isnan(verdict.logprobs[1:, 0]).all()
        emitted = torch.arange(k + 1) <= verdict.num_accepted[0]
        assert torch.isfinite(verdict.logprobs[0, emitted]).all()


def test_nan_drafter_never_emits_impossible_target_token():
    """A NaN q (broken drafter) must not make the row emit a token outside p's support."""
    g = torch.Generator().manual_seed(25)
    n, vocab = 1000, 16
    target = processed_logprobs_steps(torch.randn(n, 2, vocab, generator=g), row_params(1.0, 6, batch=n)).double()
    draft_lp = torch.full((n, 1, vocab), float("nan"), dtype=torch.float64)
    drafts = torch.randint(vocab, (n, 1), generator=g)
    verdict = verify_drafts(target, drafts, draft_lp, uniforms(g, n, 1), uniforms(g, n),
                            torch.zeros(n, dtype=torch.bool))
    assert ((verdict.tokens >= 0) & (verdict.tokens < vocab)).all()
    assert torch.isfinite(verdict.logprobs[torch.arange(n), verdict.num_accepted]).all()


# ---------------------------------------------------------------------------------------------- A8 seeding

def seeding_case(seed: int = 26):
    """A ragged, mixed greedy/sampled batch with per-row generators for the uniforms."""
    g = torch.Generator().manual_seed(seed)
    batch, k, vocab = 6, 4, 20
    target = torch.log_softmax(torch.randn(batch, k + 1, vocab, generator=g, dtype=torch.float64) * 2, -1)
    draft_lp = torch.log_softmax(target[:, :k] + torch.randn(batch, k, vocab, generator=g, dtype=torch.float64), -1)
    drafts = torch.stack([draw(draft_lp[:, i], g) for i in range(k)], 1)
    rows = [torch.Generator().manual_seed(1000 + r) for r in range(batch)]
    accept_u = torch.cat([uniforms(rg, 1, k) for rg in rows])
    resample_u = torch.cat([uniforms(rg, 1) for rg in rows])
    greedy = torch.tensor([False, False, True, False, True, False])
    lens = torch.tensor([4, 2, 3, 0, 4, 1])
    return target, drafts, draft_lp, accept_u, resample_u, greedy, lens


@pytest.mark.parametrize("stochastic", [True, False])
def test_same_uniforms_bit_identical_and_batched_equals_per_row(stochastic):
    target, drafts, draft_lp, accept_u, resample_u, greedy, lens = seeding_case()
    draft_lp = draft_lp if stochastic else None
    first = verify_drafts(target, drafts, draft_lp, accept_u, resample_u, greedy, lens)
    # Same seeds => same inputs (rebuilt from scratch) => bit-identical verdict.
    target2, drafts2, draft_lp2, accept_u2, resample_u2, greedy2, lens2 = seeding_case()
    again = verify_drafts(target2, drafts2, draft_lp2 if stochastic else None, accept_u2, resample_u2, greedy2, lens2)
    for field in ("num_accepted", "tokens", "logprobs"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    for r in range(target.shape[0]):
        sl = slice(r, r + 1)
        one = verify_drafts(target[sl], drafts[sl], draft_lp[sl] if stochastic else None, accept_u[sl],
                            resample_u[sl], greedy[sl], lens[sl])
        assert torch.equal(one.num_accepted, first.num_accepted[sl])
        assert torch.equal(one.tokens, first.tokens[sl])
        assert torch.equal(one.logprobs, first.logprobs[sl])


def test_global_rng_not_advanced():
    target, drafts, draft_lp, accept_u, resample_u, greedy, lens = seeding_case()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    verify_drafts(target, drafts, draft_lp, accept_u, resample_u, greedy, lens)
    verify_drafts(target, drafts, None, accept_u, resample_u, greedy, lens)
    verify_drafts(target, drafts, None, None, None, torch.ones(target.shape[0], dtype=torch.bool), lens)
    assert torch.equal(torch.get_rng_state(), before)
