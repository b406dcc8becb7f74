"""Choosing the speculative configuration of every decode step.

An *arm* is either ``off`` (the plain autoregressive step) or a drafter with a draft length k. The
adaptive controller predicts, for each arm and the current active batch, the step's time (cost_model.py)
and the tokens it emits (per-position acceptance rates of each drafter, exponentially weighted so a
stale drafter loses its place by itself), and takes the arm with the highest goodput: emitted tokens
per second. Switching a drafter on after it sat out costs a catch-up pass, spread over
``switch_horizon`` steps in the comparison. Optional exploration (epsilon-greedy, UCB or Thompson) keeps the
estimates of unused arms alive, but only among arms predicted within ``explore_margin`` of the best
(judged without their catch-up cost, which grows while a drafter sits out): an arm known to lose by
far is not paid for again and again (where speculation never pays, as on a
small CPU, exploring it is pure cost). When a drafter's weights change (the online learner published
a new version) its acceptance estimate is relaxed towards the prior, so the new version gets tried.
The random draws come from a seeded generator, so the choices are a deterministic function of the
seed and of the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .cost_model import CostModel
from .speculative import MAX_DRAFT_TOKENS

EXPLORATION = ("none", "epsilon", "ucb", "thompson")


@dataclass(frozen=True)
class Arm:
    drafter: str | None = None  # None: speculation off
    k: int = 0

    @property
    def label(self) -> str:
        return "off" if self.drafter is None else f"{self.drafter}:{self.k}"


OFF = Arm()


@dataclass
class ControllerConfig:
    max_draft_tokens: int = 8  # arms use k in 1..max_draft_tokens (or ``k_choices``)
    k_choices: tuple[int, ...] | None = None
    allow_off: bool = True
    # Observations over which each position's acceptance estimate forgets (time constant): a step in
    # which r rows reach a position keeps exp(-r / acceptance_memory) of its past, so a batch-1 step,
    # one noisy observation, moves it little, and a step that does not reach it leaves it be.
    acceptance_memory: float = 64.0
    cost_decay: float = 0.8  # per measurement: weight of the past in the cost corrections
    prior_acceptance: float = 0.6  # per-position acceptance assumed before a drafter is measured
    # Row-steps of evidence each position's prior counts as (position i's prior is position i - 1's
    # rate). More keeps a drafter that a few unlucky batch-1 steps put below every arm in play, at the
    # price of a slower start; exploration is what retries a drafter locked out all the same.
    prior_weight: float = 1.0
    # Thompson: an arm near the best is scored with one draw of its rates from their posteriors, so a
    # drafter that a few unlucky first steps put low is retried while it may be the best. Epsilon-greedy
    # (2%) left the better drafter locked out in half of simulated batch-1 starts, Thompson in 13%
    # (benchmarks/controller_sim.py).
    explore: str = "thompson"
    # Thompson draws costs too: each near arm's target time times exp(N(0, cost_spread^2 / (1 + n))),
    # n the measurements of its (batch, tokens) cell. Off has no rates to draw; without this, a few
    # slow off steps at a batch size left it priced too high there for good (a rollout's tail at
    # batch 2 ran the n-gram drafter at 0.6x AR's speed).
    cost_spread: float = 0.15
    # Thompson counts each observation this many times in the posteriors it draws from. Forgetting
    # caps the evidence at ~acceptance_memory observations, so unsharpened draws stay wide for good and
    # keep buying arms a few percent behind: at batch 1, where every arm is within 10-20%, that cost
    # 5-10% of the best arm's speed (docs/benchmarks.md, session 15). The means still forget as fast.
    thompson_sharpness: float = 4.0
    epsilon: float = 0.02  # explore="epsilon": share of steps spent on a random arm near the best
    explore_margin: float = 0.25  # explore only arms whose predicted goodput is within this share of the best
    ucb_scale: float = 0.1
    switch_horizon: int = 16  # steps a drafter's catch-up cost is spread over
    seed: int = 0
    profile_cache: str | None = None  # directory for the start-up profile; "" = do not cache
    record_trace: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_draft_tokens, int) or not 1 <= self.max_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"max_draft_tokens: must be an integer in [1, {MAX_DRAFT_TOKENS}], "
                             f"got {self.max_draft_tokens!r}")
        if self.k_choices is not None:
            self.k_choices = tuple(self.k_choices)
            if not self.k_choices:
                raise ValueError("k_choices: empty; give at least one k or leave it unset")
            bad = [k for k in self.k_choices if not isinstance(k, int) or not 1 <= k <= self.max_draft_tokens]
            if bad:
                raise ValueError(f"k_choices: {bad} outside [1, max_draft_tokens={self.max_draft_tokens}]")
        if not 0 < self.cost_decay < 1:
            raise ValueError(f"cost_decay: must be in (0, 1), got {self.cost_decay}")
        if not self.acceptance_memory > 0:
            raise ValueError(f"acceptance_memory: must be > 0 row-steps, got {self.acceptance_memory}")
        if not self.prior_weight > 0:
            raise ValueError(f"prior_weight: must be > 0 row-steps, got {self.prior_weight}")
        if not 0 < self.prior_acceptance < 1:
            raise ValueError(f"prior_acceptance: must be in (0, 1), got {self.prior_acceptance}")
        if self.explore not in EXPLORATION:
            raise ValueError(f"explore: must be one of {EXPLORATION}, got {self.explore!r}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon: must be in [0, 1], got {self.epsilon}")
        if not self.thompson_sharpness > 0:
            raise ValueError(f"thompson_sharpness: must be > 0, got {self.thompson_sharpness}")
        if not self.cost_spread >= 0:
            raise ValueError(f"cost_spread: must be >= 0, got {self.cost_spread}")
        if not 0 <= self.explore_margin <= 1:
            raise ValueError(f"explore_margin: must be in [0, 1], got {self.explore_margin}")
        if self.switch_horizon < 1:
            raise ValueError(f"switch_horizon: must be >= 1, got {self.switch_horizon}")

    @property
    def ks(self) -> tuple[int, ...]:
        return self.k_choices or tuple(range(1, self.max_draft_tokens + 1))


@dataclass
class StepRecord:
    """One decode step as the controller saw it (the decision trace)."""

    batch: int
    arm: str
    predicted_s: float
    measured_s: float
    emitted: int
    accepted: int


class AcceptanceEstimate:
    """Exponentially weighted per-position conditional acceptance of one drafter.

    Position i's rate is accepted-at-i / reached-i, where a row reaches i when it accepted all drafts
    before i (a row offered fewer drafts counts as a rejection, so short n-gram matches are priced in).
    Each position's past fades per row that reaches it, not per step: ``memory`` observations is its
    time constant whatever the batch and however rarely it is reached.
    """

    def __init__(self, max_k: int, memory: float, prior: float, prior_weight: float = 1.0) -> None:
        self.memory, self.prior, self.prior_weight = memory, prior, prior_weight
        self.accepted = np.zeros(max_k)
        self.reached = np.zeros(max_k)

    def rates(self) -> np.ndarray:
        """The posterior means. Position 0's prior is ``prior``; position i's is position i - 1's
        posterior mean (a draft position is rarely reached, so its own evidence is thin, and the one
        before it is the best guess: a fixed prior there made k = 2 look as good as the prior however
        poor the drafter). Each prior counts as ``prior_weight`` observations."""
        rates = np.empty(len(self.accepted))
        prior = self.prior
        for i, (accepted, reached) in enumerate(zip(self.accepted, self.reached)):
            rates[i] = prior = (accepted + prior * self.prior_weight) / (reached + self.prior_weight)
        return rates

    def sample_rates(self, rng: np.random.Generator, sharpness: float = 1.0) -> np.ndarray:
        """One draw of the rates from Beta posteriors around ``rates`` (Thompson sampling), each
        observation counted ``sharpness`` times."""
        means = self.rates()
        weight = sharpness * self.reached + self.prior_weight
        return rng.beta(means * weight, (1 - means) * weight)

    def expected_emitted(self, k: int, rates: np.ndarray | None = None) -> float:
        """Tokens per row per step: 1 + sum over j <= k of P(the first j drafts are all accepted)."""
        return 1.0 + float(np.cumprod(self.rates() if rates is None else rates)[:k].sum())

    def relax(self, keep: float) -> None:
        """Keep only ``keep`` of the evidence (the drafter changed): the prior weighs more again."""
        self.accepted *= keep
        self.reached *= keep

    def record(self, num_accepted: np.ndarray, k: int) -> None:
        positions = np.arange(k)
        reached = (num_accepted[:, None] >= positions[None, :]).sum(0)
        accepted = (num_accepted[:, None] > positions[None, :]).sum(0)
        # Each position forgets per row that reached it: one a step does not reach keeps its evidence.
        # Fading it anyway let a deep position relax to its prior (the position before's rate) while
        # the controller ran a shorter k, and sent it back to the longer k again and again.
        keep = np.exp(-reached / self.memory)
        self.accepted[:k] = self.accepted[:k] * keep + accepted
        self.reached[:k] = self.reached[:k] * keep + reached


class StaticController:
    """Always the same arm: what ``speculative=k`` with one drafter means."""

    times_drafter = False  # it learns nothing from the drafter's share of a step

    def __init__(self, arm: Arm) -> None:
        self.arm = arm
        self.max_k = arm.k
        self.trace: list[StepRecord] = []

    def choose(self, batch: int) -> Arm:
        return self.arm

    def drafter_updated(self, name: str) -> None:
        pass

    def drafters_synced(self) -> None:
        pass

    def drafter_lag(self, name: str, tokens: int) -> None:
        pass

    def record(self, arm: Arm, batch: int, seconds: float, draft_seconds: float,
               num_accepted: np.ndarray | None, emitted: int, catch_up_seconds: float = 0.0) -> None:
        pass


class AdaptiveController:
    """Picks the arm of highest predicted goodput before each step; learns from each measured step."""

    times_drafter = True

    def __init__(self, config: ControllerConfig, drafters: dict[str, str], cost: CostModel) -> None:
        """``drafters``: name -> catch-up kind ("none", "target" or "self", see ``Drafter.catch_up_kind``)."""
        if not drafters and not config.allow_off:
            raise ValueError("arms: no drafter and allow_off=False leaves nothing to choose")
        if cost.max_tokens < max(config.ks) + 1:
            raise ValueError(f"profile: covers {cost.max_tokens} tokens per row, k up to {max(config.ks)} "
                             f"needs {max(config.ks) + 1}")
        self.config, self.cost, self.catch_up_kind = config, cost, dict(drafters)
        self.max_k = max(config.ks)
        self.arms = ([OFF] if config.allow_off else []) + [Arm(d, k) for d in drafters for k in config.ks]
        self.acceptance = {d: AcceptanceEstimate(max(config.ks), config.acceptance_memory, config.prior_acceptance,
                                            config.prior_weight)
                           for d in drafters}
        self.missed = dict.fromkeys(drafters, 0.0)  # tokens per row decoded since each drafter last ran
        self.reread = dict.fromkeys(drafters, 0.0)  # of those, what its catch-up must re-read from the target
        self.uses = dict.fromkeys(self.arms, 0)  # steps taken per arm
        self._arm_tokens = np.array([1 if arm.drafter is None else arm.k + 1 for arm in self.arms])  # per row
        self.rng = np.random.default_rng(config.seed)
        self.trace: list[StepRecord] = []
        self._predicted = 0.0
        self._steps = 0

    # ---------------------------------------------------------------- decisions
    def predicted_time(self, arm: Arm, batch: int) -> float:
        if arm.drafter is None:
            return self.cost.target_time(batch, 1)
        return self.cost.target_time(batch, arm.k + 1) + self.cost.draft_time(arm.drafter, batch, arm.k)

    def switch_time(self, arm: Arm, batch: int) -> float:
        if arm.drafter is None:
            return 0.0
        name = arm.drafter
        return self.cost.catch_up_time(self.catch_up_kind[name], name, batch, self.missed[name], self.reread[name])

    def expected_emitted(self, arm: Arm) -> float:
        return 1.0 if arm.drafter is None else self.acceptance[arm.drafter].expected_emitted(arm.k)

    def goodput(self, arm: Arm, batch: int, switching: bool = True) -> float:
        """Predicted emitted tokens per second; ``switching``: with the arm's catch-up cost spread in."""
        with_switch, steady = self._goodputs([arm], batch)
        return float(with_switch[0] if switching else steady[0])

    def _goodputs(self, arms: list[Arm], batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Goodput of each arm with and without its catch-up cost, each term computed once."""
        seconds, switch = self._seconds(arms, batch)
        tokens = self._tokens(arms, batch)
        return tokens / np.maximum(seconds + switch, 1e-9), tokens / np.maximum(seconds, 1e-9)

    def _seconds(self, arms: list[Arm], batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Each arm's predicted step time and its catch-up cost spread over ``switch_horizon``."""
        seconds = np.array([self.predicted_time(arm, batch) for arm in arms])
        switch = np.array([self.switch_time(arm, batch) for arm in arms]) / self.config.switch_horizon
        return seconds, switch

    def _tokens(self, arms: list[Arm], batch: int, rates: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Expected emitted tokens per step; ``rates``: per drafter, rates to use instead of the means."""
        # Each drafter's rates once per call, not once per (drafter, k) arm.
        chained = rates or {name: estimate.rates() for name, estimate in self.acceptance.items()}
        reach = {name: np.cumprod(r) for name, r in chained.items()}
        return batch * np.array([1.0 if arm.drafter is None else 1.0 + float(reach[arm.drafter][:arm.k].sum())
                                 for arm in arms])

    def _cost_draws(self, batch: int) -> np.ndarray:
        """A factor per arm on its predicted time, spread as one step over the measurements of its cell."""
        measured = self.cost.observations(batch, self._arm_tokens)
        return np.exp(self.config.cost_spread * self.rng.standard_normal(len(self.arms)) / np.sqrt(1 + measured))

    def choose(self, batch: int) -> Arm:
        # Arms worth exploring are judged without their catch-up cost, which grows with every step a
        # drafter sits out; judged with it, a drafter once passed over could never be tried again.
        seconds, switch = self._seconds(self.arms, batch)
        tokens = self._tokens(self.arms, batch)
        greedy = tokens / np.maximum(seconds + switch, 1e-9)
        near = tokens / np.maximum(seconds, 1e-9) >= (1 - self.config.explore_margin) * greedy.max()
        scores = greedy
        if self.config.explore == "ucb":
            uses = np.array([self.uses[arm] for arm in self.arms], dtype=np.float64)
            bonus = 1 + self.config.ucb_scale * np.sqrt(math.log(self._steps + 2) / (uses + 1))
            scores = np.where(near, greedy * bonus, greedy)
        if self.config.explore == "thompson":  # each arm as good as one plausible draw of its rates and cost
            drawn = {name: estimate.sample_rates(self.rng, self.config.thompson_sharpness)
                     for name, estimate in self.acceptance.items()}
            drawn_seconds = seconds * self._cost_draws(batch)
            scores = np.where(near, self._tokens(self.arms, batch, drawn) / np.maximum(drawn_seconds + switch, 1e-9),
                              greedy)
        index = int(scores.argmax())
        if self.config.explore == "epsilon" and self.rng.random() < self.config.epsilon:
            candidates = np.flatnonzero(near)
            index = int(candidates[self.rng.integers(len(candidates))])
        self._predicted = float(seconds[index] + switch[index] * self.config.switch_horizon)
        return self.arms[index]

    # ---------------------------------------------------------------- learning
    def drafters_synced(self) -> None:
        """Every drafter's state covers every active row (the engine prefilled a fresh set of rows):
        none has anything to catch up on."""
        for name in self.missed:
            self.missed[name] = self.reread[name] = 0.0

    def drafter_lag(self, name: str, tokens: int) -> None:
        """``name`` sat out the last step but kept up: its catch-up would re-read only ``tokens`` per row."""
        if name in self.reread:
            self.reread[name] = float(tokens)

    def drafter_updated(self, name: str, keep: float = 0.25) -> None:
        """``name`` now drafts with new weights: its past acceptance says less about it."""
        if name in self.acceptance:
            self.acceptance[name].relax(keep)

    def record(self, arm: Arm, batch: int, seconds: float, draft_seconds: float,
               num_accepted: np.ndarray | None, emitted: int, catch_up_seconds: float = 0.0) -> None:
        """After a step with ``arm``: its wall time, the drafter's proposal and catch-up times within
        it and, when drafting, the accepted drafts per row."""
        self._steps += 1
        self.uses[arm] += 1
        tokens = 1 if arm.drafter is None else arm.k + 1
        self.cost.record_target(batch, tokens, seconds - draft_seconds - catch_up_seconds)
        if arm.drafter is not None:
            self.cost.record_draft(arm.drafter, batch, arm.k, draft_seconds)
            if catch_up_seconds > 0:
                self.cost.record_catch_up(self.catch_up_kind[arm.drafter], arm.drafter, batch,
                                          self.missed[arm.drafter], catch_up_seconds, self.reread[arm.drafter])
            self.missed[arm.drafter] = self.reread[arm.drafter] = 0.0
            self.acceptance[arm.drafter].record(num_accepted, arm.k)
        per_row = emitted / max(batch, 1)
        for name in self.missed:
            if arm.drafter != name:
                self.missed[name] += per_row
                self.reread[name] += per_row
        if self.config.record_trace:
            accepted = int(num_accepted.sum()) if num_accepted is not None else 0
            self.trace.append(StepRecord(batch, arm.label, self._predicted, seconds, emitted, accepted))


@dataclass
class TraceSummary:
    steps: int = 0
    arms: dict[str, int] = field(default_factory=dict)
    median_relative_error: float = float("nan")  # |predicted - measured| / measured, after warm-up


def summarize_trace(trace: list[StepRecord], warmup: int = 10) -> TraceSummary:
    arms: dict[str, int] = {}
    for record in trace:
        arms[record.arm] = arms.get(record.arm, 0) + 1
    later = trace[warmup:]
    errors = [abs(r.predicted_s - r.measured_s) / r.measured_s for r in later if r.measured_s > 0]
    return TraceSummary(len(trace), arms, float(np.median(errors)) if errors else float("nan"))
