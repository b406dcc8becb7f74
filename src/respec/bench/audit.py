"""``respec audit``: check that speculative rollouts are exact for *your* model, drafter and settings.

Three checks, each with its measured figure:
1. distribution: many samples of one prompt through the speculative engine; the 2nd and 3rd tokens
   (the first ones a verify step emits) are compared, per observed prefix, with the target's exact
   processed distribution (chi-square goodness of fit, rare cells pooled until the pool expects >= 5).
2. greedy: speculative greedy output equals plain greedy output token for token.
3. logprobs: logprobs returned with speculative samples equal a teacher-forced recompute.
The distribution check is repeated with a verifier that accepts every draft (the negative control);
it must fail, which shows the test has the power to catch a biased sampler. A check on too little
evidence (fewer than ``MIN_DOF`` degrees of freedom after pooling) fails, and a control that goes
undetected fails the audit with the number of samples it would take.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from ..engine.llm import LLM
from ..engine.params import SamplingParams
from ..engine.sampling import RowParams, processed_logprobs, uniform_row_params

P_VALUE_THRESHOLD = 1e-3
MIN_DOF = 5  # below this a distribution check has seen too few distinct outcomes to mean anything
POWER = 0.9  # the chance with which the needed sample count detects the control's bias


@dataclass
class AuditCheck:
    name: str
    passed: bool
    figure: str
    chi2: float | None = None  # distribution checks: the statistic, its degrees of freedom, the samples
    dof: int = 0
    samples: int = 0


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """(chi-square statistic, degrees of freedom) of ``observed`` counts vs ``expected`` counts.

    Cells of expected count < 5 are pooled, and the pool takes the next-smallest cells until it too
    expects at least 5: a pool expecting 0.01 that draws one sample would add ~100 to the statistic,
    a heavy tail the chi-square law does not have (a correct sampler then fails one audit in a few).
    """
    if bool((observed[expected <= 0] > 0).any()):  # a sample where the target has no mass at all
        return float("inf"), 1
    order = torch.argsort(expected)
    exp, obs = expected[order], observed[order]
    before = torch.cumsum(exp, 0) - exp  # expected count of all smaller cells
    pooled = (exp < 5) | (before < 5)
    obs = torch.cat((obs[~pooled], obs[pooled].sum()[None]))
    exp = torch.cat((exp[~pooled], exp[pooled].sum()[None]))
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    # One cell left (a small group): no information, 0 degrees of freedom.
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def p_value(chi2: float, dof: int) -> float:
    if chi2 == float("inf"):
        return 0.0
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


def _row_params(params: SamplingParams, rows: int) -> RowParams:
    return uniform_row_params(rows, params.temperature, params.top_k, params.top_p)


@torch.no_grad()
def _exact_next(llm: LLM, prefixes: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Processed target distribution after each prefix (all of equal length): ``[N, V]`` float64."""
    model = llm.model
    ids = torch.tensor(prefixes, device=model.device)
    hidden = model(ids).hidden[:, -1]
    return processed_logprobs(model.logits(hidden), _row_params(params, len(prefixes))).double().exp().cpu()


def distribution_check(llm: LLM, prompt: list[int], params: SamplingParams, samples: int,
                       max_groups: int = 64) -> AuditCheck:
    k = llm.engine.draft_tokens
    per_request = min(samples, llm.engine.max_num_seqs)
    runs = [SamplingParams(n=per_request, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                           max_new_tokens=k + 2, ignore_eos=True,
                           seed=None if params.seed is None else params.seed * 1000 + i)
            for i in range(-(-samples // per_request))]
    outputs = llm.generate([prompt] * len(runs), runs, progress=False)
    tokens = [s.token_ids[:3] for o in outputs for s in o.samples]
    chi2_total, dof_total = 0.0, 0
    for depth in (1, 2):  # token 2 given token 1, token 3 given tokens 1-2
        groups: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for t in tokens:
            groups[tuple(t[:depth])][t[depth]] += 1
        chosen = sorted(groups, key=lambda g: -sum(groups[g].values()))[:max_groups]
        exact = _exact_next(llm, [prompt + list(g) for g in chosen], params)
        for g, p in zip(chosen, exact):
            count = sum(groups[g].values())
            observed = torch.zeros_like(p)
            for token, c in groups[g].items():
                observed[token] = c
            chi2, dof = chi_square_p_value(observed, p * count)
            chi2_total, dof_total = chi2_total + chi2, dof_total + dof
    value = p_value(chi2_total, dof_total)
    figure = (f"chi2 {chi2_total:.1f} on {dof_total} dof, p = {value:.3g} (pass > {P_VALUE_THRESHOLD:g}); "
              f"{len(tokens)} samples")
    if dof_total < MIN_DOF:
        figure = f"too little evidence: {figure} (needs >= {MIN_DOF} dof after pooling; raise --samples)"
    return AuditCheck("distribution", value > P_VALUE_THRESHOLD and dof_total >= MIN_DOF, figure, chi2_total,
                      dof_total, len(tokens))


def greedy_check(llm: LLM, prompts: list[list[int]], max_new_tokens: int) -> AuditCheck:
    plain = LLM(llm.model, tokenizer=llm.tokenizer, max_num_seqs=llm.engine.max_num_seqs)
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    reference = [o.samples[0].token_ids for o in plain.generate(prompts, params, progress=False)]
    speculative = [o.samples[0].token_ids for o in llm.generate(prompts, params, progress=False)]
    same = sum(a == b for a, b in zip(reference, speculative))
    return AuditCheck("greedy", same == len(prompts), f"{same}/{len(prompts)} prompts identical "
                      f"({sum(len(r) for r in reference)} tokens)")


@torch.no_grad()
def logprob_check(llm: LLM, prompts: list[list[int]], params: SamplingParams, max_new_tokens: int) -> AuditCheck:
    sampled = SamplingParams(n=2, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             max_new_tokens=max_new_tokens, seed=params.seed)
    worst = 0.0
    for output in llm.generate(prompts, sampled, progress=False):
        for sample in output.samples:
            ids = torch.tensor([output.prompt_token_ids + sample.token_ids], device=llm.model.device)
            hidden = llm.model(ids).hidden[0, len(output.prompt_token_ids) - 1: -1]
            logprobs = processed_logprobs(llm.model.logits(hidden), _row_params(params, hidden.shape[0]))
            recomputed = logprobs.gather(-1, ids[0, len(output.prompt_token_ids):, None]).squeeze(-1).cpu()
            worst = max(worst, float((recomputed - torch.tensor(sample.logprobs)).abs().max()))
    tolerance = 1e-4 if llm.model.dtype == torch.float32 else 2e-2
    return AuditCheck("logprobs", worst <= tolerance,
                      f"max |rollout - recompute| = {worst:.2e} (pass <= {tolerance:g})")


@contextlib.contextmanager
def always_accept(llm: LLM):
    """``llm``'s engine with a deliberately broken verifier while the block runs: every draft is
    accepted (uniform forced to ~0; vllm-ascend #13766)."""
    engine = llm.engine
    real = engine.verify

    def broken(target, drafts, draft_logprobs, accept_u, resample_u, greedy, lens=None, **options):
        forced = torch.full_like(accept_u, 1e-300) if accept_u is not None else None
        if draft_logprobs is None:  # deterministic drafts: as a one-hot q, so the forced test applies
            draft_logprobs = torch.full((*drafts.shape, target.shape[-1]), -torch.inf, dtype=target.dtype,
                                        device=target.device).scatter_(-1, drafts[..., None], 0.0)
        return real(target, drafts, draft_logprobs, forced, resample_u, greedy, lens, **options)

    engine.verify = broken
    try:
        yield
    finally:
        engine.verify = real


def run_audit(llm: LLM, prompts: list[list[int]], params: SamplingParams, samples: int = 4000,
              max_new_tokens: int = 48, negative_control: bool = True) -> list[AuditCheck]:
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: must be an integer >= 1, got {samples!r}")
    if llm.engine.draft_tokens == 0:
        raise ValueError("drafter: the audit needs a speculative LLM (pass --drafter)")
    if params.greedy:
        raise ValueError("temperature: the distribution audit needs temperature > 0")
    checks = [distribution_check(llm, prompts[0], params, samples),
              greedy_check(llm, prompts, max_new_tokens),
              logprob_check(llm, prompts, params, max_new_tokens)]
    if negative_control:
        with always_accept(llm):
            broken = distribution_check(llm, prompts[0], params, samples)
        checks.append(control_check(broken))
    return checks


def control_check(broken: AuditCheck) -> AuditCheck:
    """The negative control passes when the always-accept sampler's distribution check fails on enough
    evidence; otherwise the audit cannot tell such a bias at this sample count, and says what would."""
    name = "negative control (always-accept must fail)"
    detected = broken.chi2 is not None and p_value(broken.chi2, broken.dof) <= P_VALUE_THRESHOLD \
        and broken.dof >= MIN_DOF
    if detected:
        return AuditCheck(name, True, broken.figure, broken.chi2, broken.dof, broken.samples)
    needed = samples_needed(broken.samples, broken.chi2 or 0.0, broken.dof)
    advice = f"about {needed} samples would detect it" if needed else "more samples (no bias measurable yet)"
    return AuditCheck(name, False, f"not detected, so the audit has no power here: {broken.figure}; {advice}",
                      broken.chi2, broken.dof, broken.samples)


def critical_value(dof: int, threshold: float = P_VALUE_THRESHOLD) -> float:
    """The chi-square statistic on ``dof`` degrees of freedom whose p-value is ``threshold``."""
    low, high = 0.0, 10.0 * dof + 100.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(middle, dof) > threshold else (low, middle)
    return high


def samples_needed(samples: int, chi2: float, dof: int, threshold: float = P_VALUE_THRESHOLD,
                   power: float = POWER) -> int | None:
    """Samples at which a bias that gave ``chi2`` on ``dof`` with ``samples`` samples would be detected
    with probability ``power``: its noncentrality chi2 - dof grows with the samples, and the normal
    approximation of the noncentral chi-square says how far it must grow. None: no bias measured."""
    dof = max(dof, MIN_DOF)
    observed = chi2 - dof
    if observed <= 0 or samples <= 0:
        return None
    critical, z = critical_value(dof, threshold), statistics.NormalDist().inv_cdf(power)
    low, high = 0.0, 1e12
    for _ in range(200):
        middle = (low + high) / 2
        enough = dof + middle - z * math.sqrt(2 * (dof + 2 * middle)) >= critical
        low, high = (low, middle) if enough else (middle, high)
    return math.ceil(samples * high / observed)



def format_audit(checks: list[AuditCheck]) -> str:
    lines = [f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.figure}" for c in checks]
    verdict = "all checks passed" if all(c.passed for c in checks) else "AUDIT FAILED"
    return "\n".join([*lines, verdict])
