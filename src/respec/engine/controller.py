"""Choosing the speculative configuration of every decode step, and the one factory that builds the chooser.

An *arm* is either ``off`` (the plain autoregressive step) or a drafter with a draft length k. The
adaptive controller predicts, for each arm and the current active batch, the step's time (cost_model.py)
and the tokens it emits (per-position acceptance rates of each drafter, exponentially weighted so a
stale drafter loses its place by itself, acceptance.py), and takes the arm with the highest goodput:
emitted tokens per second. Switching a drafter on after it sat out costs a catch-up pass, spread over
``switch_horizon`` steps in the comparison. Thompson sampling keeps the estimates of unused arms alive,
but only among arms predicted within ``explore_margin`` of the best (judged without their catch-up
cost, which grows while a drafter sits out): an arm known to lose by far is not paid for again and
again (where speculation never pays, as on a small CPU, exploring it is pure cost). When a drafter's
weights change (the online learner published a new version) its acceptance estimate is relaxed
towards the prior, so the new version gets tried. The random draws come from a seeded generator, so
the choices are a deterministic function of the seed and of the measurements.

``speculative`` means the same everywhere (``LLM``, ``Engine``, the trainer's ``rollout`` section, the
CLI): ``None`` or ``"off"``, an int k (one drafter, k drafts every step), ``"adaptive"`` or a
``ControllerConfig``; ``make_controller`` turns it into a controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .acceptance import AcceptanceEstimate
from .cost_model import CostModel
from .speculative import MAX_DRAFT_TOKENS
from .stats import StepRecord

if TYPE_CHECKING:
    from ..models.decoder import DecoderLM
    from .drafters.base import Drafter

DEFAULT_K = 4  # drafts per step when one drafter is given without ``speculative``


@dataclass(frozen=True)
class Arm:
    drafter: str | None = None  # None: speculation off
    k: int = 0

    @property
    def label(self) -> str:
        return "off" if self.drafter is None else f"{self.drafter}:{self.k}"


OFF = Arm()


@dataclass(frozen=True)
class ControllerTuning:
    """The controller's constants. Each default is the one the measurements favoured
    (docs/ARCHITECTURE.md, benchmarks/controller_sim.py); change them only to study the controller."""

    prior_acceptance: float = 0.6  # per-position acceptance assumed before a drafter is measured
    # Row-steps of evidence each position's prior counts as (position i's prior is position i - 1's rate).
    prior_weight: float = 1.0
    cost_decay: float = 0.8  # per measurement: weight of the past in the cost corrections
    # Thompson draws costs too: each near arm's target time times exp(N(0, cost_spread^2 / (1 + n))),
    # n the measurements of its (batch, tokens) cell. Off has no rates to draw; without this, a few
    # slow off steps at a batch size left it priced too high there for good (a rollout's tail at
    # batch 2 ran the n-gram drafter at 0.6x AR's speed).
    cost_spread: float = 0.15
    # Thompson counts each observation this many times in the posteriors it draws from. Forgetting
    # caps the evidence at ~acceptance_memory observations, so unsharpened draws stay wide for good and
    # keep buying arms a few percent behind (5-10% of the best arm's speed at batch 1, where every arm
    # is within 10-20%). The means still forget as fast.
    thompson_sharpness: float = 4.0
    explore_margin: float = 0.25  # explore only arms whose predicted goodput is within this share of the best
    switch_horizon: int = 16  # steps a drafter's catch-up cost is spread over

    def __post_init__(self) -> None:
        for name, low, high in (("prior_acceptance", 0.0, 1.0), ("cost_decay", 0.0, 1.0)):
            value = getattr(self, name)
            if not low < value < high:
                raise ValueError(f"{name}: must be in ({low:g}, {high:g}), got {value}")
        for name in ("prior_weight", "thompson_sharpness"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.cost_spread >= 0:
            raise ValueError(f"cost_spread: must be >= 0, got {self.cost_spread}")
        if not 0 <= self.explore_margin <= 1:
            raise ValueError(f"explore_margin: must be in [0, 1], got {self.explore_margin}")
        if not isinstance(self.switch_horizon, int) or self.switch_horizon < 1:
            raise ValueError(f"switch_horizon: must be an integer >= 1, got {self.switch_horizon!r}")


@dataclass
class ControllerConfig:
    """The adaptive SD server's settings (``speculative=ControllerConfig(...)``, ``rollout.controller``)."""

    max_draft_tokens: int = 8  # arms use k in 1..max_draft_tokens (or ``k_choices``)
    k_choices: tuple[int, ...] | None = None
    allow_off: bool = True  # False: always speculate (with the best drafter and k)
    # Thompson sampling among arms near the best (False: always the arm predicted best). Epsilon-greedy
    # at 2% left the better drafter locked out after unlucky first steps in half of simulated batch-1
    # starts, Thompson in 13%, at equal or better goodput at every batch size (controller_sim.py).
    explore: bool = True
    # Observations over which each position's acceptance estimate forgets (time constant): a stale
    # drafter is priced down within a few of these. 256 gained nothing measurable and reacted too slowly.
    acceptance_memory: float = 64.0
    seed: int | None = None  # of the exploration draws; None: 0 (the trainer passes its run seed)
    profile_cache: str | None = None  # directory for the start-up profile; "" = do not cache
    tuning: ControllerTuning = field(default_factory=ControllerTuning)

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
        if not self.acceptance_memory > 0:
            raise ValueError(f"acceptance_memory: must be > 0 row-steps, got {self.acceptance_memory}")
        if not isinstance(self.explore, bool):
            raise ValueError(f"explore: must be true (Thompson sampling) or false, got {self.explore!r}")

    @property
    def ks(self) -> tuple[int, ...]:
        return self.k_choices or tuple(range(1, self.max_draft_tokens + 1))


def resolve_speculative(speculative: object, drafters: list[str]) -> int | ControllerConfig | None:
    """``speculative`` in one of its spellings -> None (off), k, or a ControllerConfig; checked against
    the drafters given (``drafters``: their names)."""
    if speculative is None:
        if len(drafters) > 1:
            raise ValueError(f"speculative: {len(drafters)} drafters need speculative='adaptive' (or a "
                             f"ControllerConfig) to choose among them")
        return DEFAULT_K if drafters else None
    if speculative == "off":
        if drafters:
            raise ValueError(f"speculative: 'off' with drafters {drafters}; drop the drafters or give k or 'adaptive'")
        return None
    if speculative == "adaptive":
        speculative = ControllerConfig()
    if isinstance(speculative, ControllerConfig):
        if not drafters:
            raise ValueError("speculative: needs a drafter (drafter='ngram', 'self:N', an EAGLE head or a model path)")
        return speculative
    if isinstance(speculative, int) and not isinstance(speculative, bool):
        if not 1 <= speculative <= MAX_DRAFT_TOKENS:
            raise ValueError(f"speculative: k must be in [1, {MAX_DRAFT_TOKENS}], got {speculative}")
        if len(drafters) != 1:
            raise ValueError(f"speculative: k = {speculative} drafts with exactly one drafter, got "
                             f"{len(drafters)} ({drafters}); use 'adaptive' to choose among several")
        return speculative
    raise ValueError(f"speculative: expected None, 'off', an int k, 'adaptive' or a ControllerConfig, "
                     f"got {speculative!r}")


def make_controller(speculative: object, drafters: dict[str, Drafter], model: DecoderLM,
                    max_num_seqs: int) -> StaticController | AdaptiveController | None:
    """The controller for ``speculative`` (see ``resolve_speculative``) over ``drafters``; an adaptive
    one profiles the target first (cached on disk)."""
    resolved = resolve_speculative(speculative, list(drafters))
    if resolved is None:
        return None
    if isinstance(resolved, int):
        return StaticController(Arm(next(iter(drafters)), resolved))
    cost = CostModel.profile(model, max_num_seqs, max(resolved.ks) + 1, cache_dir=resolved.profile_cache,
                             decay=resolved.tuning.cost_decay)
    return AdaptiveController(resolved, {name: d.catch_up_kind for name, d in drafters.items()}, cost)


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
        self.config, self.tuning, self.cost, self.catch_up_kind = config, config.tuning, cost, dict(drafters)
        self.max_k = max(config.ks)
        self.arms = ([OFF] if config.allow_off else []) + [Arm(d, k) for d in drafters for k in config.ks]
        self.acceptance = {d: AcceptanceEstimate(self.max_k, config.acceptance_memory, self.tuning.prior_acceptance,
                                                 self.tuning.prior_weight)
                           for d in drafters}
        self.missed = dict.fromkeys(drafters, 0.0)  # tokens per row decoded since each drafter last ran
        self.reread = dict.fromkeys(drafters, 0.0)  # of those, what its catch-up must re-read from the target
        self._arm_tokens = np.array([1 if arm.drafter is None else arm.k + 1 for arm in self.arms])  # per row
        self.rng = np.random.default_rng(config.seed or 0)
        self.trace: list[StepRecord] = []
        self._predicted = 0.0

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
        switch = np.array([self.switch_time(arm, batch) for arm in arms]) / self.tuning.switch_horizon
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
        return np.exp(self.tuning.cost_spread * self.rng.standard_normal(len(self.arms)) / np.sqrt(1 + measured))

    def choose(self, batch: int) -> Arm:
        # Arms worth exploring are judged without their catch-up cost, which grows with every step a
        # drafter sits out; judged with it, a drafter once passed over could never be tried again.
        seconds, switch = self._seconds(self.arms, batch)
        tokens = self._tokens(self.arms, batch)
        greedy = tokens / np.maximum(seconds + switch, 1e-9)
        near = tokens / np.maximum(seconds, 1e-9) >= (1 - self.tuning.explore_margin) * greedy.max()
        scores = greedy
        if self.config.explore:  # each near arm as good as one plausible draw of its rates and cost
            drawn = {name: estimate.sample_rates(self.rng, self.tuning.thompson_sharpness)
                     for name, estimate in self.acceptance.items()}
            drawn_seconds = seconds * self._cost_draws(batch)
            scores = np.where(near, self._tokens(self.arms, batch, drawn) / np.maximum(drawn_seconds + switch, 1e-9),
                              greedy)
        index = int(scores.argmax())
        self._predicted = float(seconds[index] + switch[index] * self.tuning.switch_horizon)
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
        accepted = int(num_accepted.sum()) if num_accepted is not None else 0
        self.trace.append(StepRecord(batch, arm.label, self._predicted, seconds, emitted, accepted))
