"""One simulated rollout: decode steps on a simulated clock, the active batch shrinking as rows finish.

Every step the policy picks off or (eagle, k) for the active batch. Off emits one token per row. A
chain step offers each row min(k, tokens left - 1) drafts; draft i of a row whose next token has index
g is accepted when ``U[row, g + i] < alpha_row[i]``, and the row emits its accepted drafts plus one.
The uniforms ``U``, the rows' curves, the lengths and the step-time noise are drawn once per rollout
from the world's seed (``Draws``) and shared by every policy: common random numbers, so two policies
differ only by their choices. The clock advances by the roofline cost (hardware.py) times the step's
noise. The drafter's state follows the engine's EAGLE head: the prompt is its first pending block
(deferred prefill), steps it sits out are shadowed up to ``shadow_limit`` decoded entries per row, past
that a row lags and its catch-up re-reads the missed positions from the target; switching on pays one
catch-up (``StepCosts.catch_up``) inside the step. As the engine does (``Drafter.absorb_due``), once a
row's shadow block could not take another verify block and the policy keeps the head warm, the head
absorbs every row's block after that step (a catch-up on the clock, outside the step the policy
measured) and the policy hears that it is in sync; ``World.head_absorbs=False`` turns that off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ...engine.controller import Arm
from .acceptance import MAX_K, Drift, row_rates
from .hardware import StepCosts
from .workload import Workload

DRAFTER = "eagle"


@dataclass(frozen=True)
class World:
    name: str
    costs: StepCosts
    curve: np.ndarray  # the drafter's per-position acceptance at RL step 0
    drift: Drift
    workload: Workload
    rl_steps: tuple[int, ...] = (0, 50, 100)  # the RL steps whose rollouts are simulated
    row_spread: float = 0.3  # sd of each row's logit shift of the curve (prompts differ)
    noise: float = 0.03  # lognormal sd of each step's time
    shadow_limit: int = 256
    head_absorbs: bool = True  # the engine absorbs full shadow blocks while the head sits out
    max_k: int = MAX_K
    seed: int = 0

    def rates_at(self, rl_step: int) -> np.ndarray:
        return self.drift.rates_at(self.curve, rl_step)


@dataclass(frozen=True)
class Draws:
    """Everything random in one rollout, the same for every policy."""

    prompts: np.ndarray  # [rows]
    budgets: np.ndarray  # [rows] response lengths
    rates: np.ndarray  # [rows, max_k] per-row acceptance at this RL step
    uniforms: np.ndarray  # [rows, max budget + max_k + 1]
    noise: np.ndarray  # [max budget + 1] factor on each step's time

    @classmethod
    def make(cls, world: World, rl_step: int) -> Draws:
        rng = np.random.default_rng([world.seed, rl_step])
        prompts, budgets = world.workload.draw(rng)
        rates = row_rates(world.rates_at(rl_step), len(budgets), world.row_spread, rng)
        uniforms = rng.random((len(budgets), int(budgets.max()) + world.max_k + 1))
        noise = np.exp(world.noise * rng.standard_normal(int(budgets.max()) + 1))
        return cls(prompts, budgets, rates, uniforms, noise)


@dataclass
class StepOutcome:
    """What a policy learns from one step (the engine's ``controller.record`` arguments)."""

    arm: Arm
    batch: int
    seconds: float
    draft_seconds: float
    catch_up_seconds: float
    accepted: np.ndarray | None  # per active row, None for an off step
    emitted: int
    lag: int  # after an off step: tokens per row the drafter could not shadow (``drafter.lag``)


class Policy(Protocol):
    name: str
    drafts: bool  # has a drafter (False: plain decoding, which never shadows or absorbs)

    def start(self, world: World, rl_step: int, draws: Draws) -> None: ...

    def choose(self, batch: int) -> Arm: ...

    def observe(self, outcome: StepOutcome) -> None: ...

    def keeps_warm(self) -> bool: ...  # absorb the idle head's full shadow blocks (``controller.keeps_warm``)

    def absorbed(self) -> None: ...  # the idle head absorbed its shadow after the last step


@dataclass
class RolloutResult:
    seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    batches: list[int] = field(default_factory=list)  # active batch per step
    ks: list[int] = field(default_factory=list)  # 0 = off
    step_seconds: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    catch_up_seconds: float = 0.0
    absorb_seconds: float = 0.0

    @property
    def accept_len(self) -> float:
        """Tokens per row per speculative step (includes the bonus token)."""
        spec = [(b, k) for b, k in zip(self.batches, self.ks) if k]
        rows = sum(b for b, _ in spec)
        return (self.accepted + rows) / rows if rows else 0.0


def prefill_seconds(costs: StepCosts, prompts: np.ndarray) -> float:
    """One forward over every prompt (the same for every policy)."""
    return costs.target(len(prompts), float(prompts.mean()), 0.0)


def _chain_hits(draws: Draws, rows: np.ndarray, generated: np.ndarray, k: int) -> np.ndarray:
    offered = np.minimum(k, draws.budgets[rows] - generated - 1)
    index = generated[:, None] + np.arange(k)[None, :]
    ok = draws.uniforms[rows[:, None], index] < draws.rates[rows, :k]
    ok &= np.arange(k)[None, :] < offered[:, None]
    return np.cumprod(ok, axis=1).sum(axis=1)


class _HeadState:
    """Per row: pending entries the head has not run over (prompt + shadowed) and positions it lags."""

    def __init__(self, prompts: np.ndarray, limit: int) -> None:
        self.pending, self.shadowed = prompts.astype(np.float64), np.zeros(len(prompts))
        self.gap, self.limit = np.zeros(len(prompts)), limit

    def sit_out(self, rows: np.ndarray) -> int:
        fits = (self.gap[rows] == 0) & (self.shadowed[rows] + 1 <= self.limit)
        self.pending[rows[fits]] += 1
        self.shadowed[rows[fits]] += 1
        self.gap[rows[~fits]] += 1
        return int(self.gap[rows].max(initial=0))

    def absorb_due(self, rows: np.ndarray, block: int) -> bool:
        """A row's shadow block could not take one more verify block (``EagleDrafter.absorb_due``)."""
        return self.limit > 0 and bool(np.any(self.shadowed[rows] >= max(1, self.limit - block + 1)))

    def catch_up(self, costs: StepCosts, rows: np.ndarray, context: float) -> float:
        reread = float(self.gap[rows].max(initial=0))
        pending = float((self.pending[rows] + self.gap[rows]).max(initial=0))
        self.pending[rows] = self.shadowed[rows] = self.gap[rows] = 0
        return costs.catch_up(len(rows), pending, reread, context) if pending > 0 else 0.0


def run_rollout(world: World, policy: Policy, rl_step: int, draws: Draws | None = None) -> RolloutResult:
    """Decode every row of one rollout under ``policy``; returns its clock and trace."""
    draws = draws or Draws.make(world, rl_step)
    costs, result = world.costs, RolloutResult()
    generated = np.ones(len(draws.budgets), dtype=np.int64)  # the first token is sampled at prefill
    head = _HeadState(draws.prompts, world.shadow_limit)
    active = np.flatnonzero(generated < draws.budgets)
    policy.start(world, rl_step, draws)
    result.seconds = prefill_seconds(costs, draws.prompts)
    while active.size:
        batch = int(active.size)
        context = float((draws.prompts[active] + generated[active]).sum())
        if hasattr(policy, "see_rows"):  # oracles only (oracles.py): the rows' state no real policy sees
            policy.see_rows(active, generated)
        arm = policy.choose(batch)
        if arm.drafter is None:
            seconds, draft_s, catch_s, hits, emitted = costs.target(batch, 1, context), 0.0, 0.0, None, 1
            lag = head.sit_out(active)
        else:
            catch_s = head.catch_up(costs, active, context)
            step_s, draft_s = costs.chain_step(batch, arm.k, context)
            hits = _chain_hits(draws, active, generated[active], arm.k)
            seconds, emitted, lag = step_s + catch_s, hits + 1, 0
            result.drafted += int(np.minimum(arm.k, draws.budgets[active] - generated[active] - 1).sum())
            result.accepted += int(hits.sum())
        factor = float(draws.noise[min(result.steps, len(draws.noise) - 1)])
        generated[active] += emitted
        total_emitted = batch if hits is None else int(emitted.sum())
        policy.observe(StepOutcome(arm, batch, seconds * factor, draft_s * factor, catch_s * factor, hits,
                                   total_emitted, lag))
        active = active[generated[active] < draws.budgets[active]]  # finished rows leave first, as in the engine
        if arm.drafter is None and world.head_absorbs and policy.drafts \
                and head.absorb_due(active, world.max_k + 1) and policy.keeps_warm():
            context = float((draws.prompts[active] + generated[active]).sum())
            absorbed = head.catch_up(costs, active, context) * factor
            policy.absorbed()
            result.absorb_seconds += absorbed
            result.decode_seconds += absorbed
        result.decode_seconds += seconds * factor
        result.catch_up_seconds += catch_s * factor
        result.steps += 1
        result.tokens += total_emitted
        result.batches.append(batch)
        result.step_seconds.append(seconds * factor)
        result.ks.append(arm.k if arm.drafter is not None else 0)
    result.seconds += result.decode_seconds
    return result
