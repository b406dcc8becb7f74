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

``make_controller`` builds the controller a ``speculative`` value (speculation.py) asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .acceptance import AcceptanceEstimate
from .cost_model import CostModel
from .speculation import ControllerConfig, resolve_speculative
from .stats import StepRecord

if TYPE_CHECKING:
    from ..models.decoder import DecoderLM
    from .drafters.base import Drafter

@dataclass(frozen=True)
class Arm:
    drafter: str | None = None  # None: speculation off
    k: int = 0

    @property
    def label(self) -> str:
        return "off" if self.drafter is None else f"{self.drafter}:{self.k}"


OFF = Arm()


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

    def drafter_synced(self, name: str) -> None:
        pass

    def keeps_warm(self, name: str) -> bool:
        return False

    def prefill_pending(self, name: str) -> None:
        pass

    def record(self, arm: Arm, batch: int, seconds: float, draft_seconds: float,
               num_accepted: np.ndarray | None, emitted: int, catch_up_seconds: float = 0.0,
               timed: bool = True) -> None:
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
        self._prefill_pending: set[str] = set()  # drafters whose next catch-up runs a deferred prefill

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

    def drafter_synced(self, name: str) -> None:
        """``name`` caught up while sitting out (the engine absorbed its pending block): switching it on
        costs nothing until it misses more steps, and that catch-up ran no deferred prefill."""
        if name in self.missed:
            self.missed[name] = self.reread[name] = 0.0
            self._prefill_pending.discard(name)

    def keeps_warm(self, name: str) -> bool:
        """Whether an idle drafter is worth keeping in sync while it sits out: its best arm at batch 1
        (where a rollout's tail ends) is predicted within ``explore_margin`` of plain decoding."""
        arms = [OFF] + [arm for arm in self.arms if arm.drafter == name]
        if len(arms) == 1:
            return False
        _, steady = self._goodputs(arms, 1)
        return bool(steady[1:].max() >= (1 - self.tuning.explore_margin) * steady[0])

    def drafter_lag(self, name: str, tokens: int) -> None:
        """``name`` sat out the last step but kept up: its catch-up would re-read only ``tokens`` per row."""
        if name in self.reread:
            self.reread[name] = float(tokens)

    def prefill_pending(self, name: str) -> None:
        """``name`` deferred the prefill of newly admitted prompts to its next catch-up: that catch-up's
        time is prompt work, not a measure of catching up on missed tokens, so it teaches nothing."""
        self._prefill_pending.add(name)

    def drafter_updated(self, name: str, keep: float = 0.25) -> None:
        """``name`` now drafts with new weights: its past acceptance says less about it."""
        if name in self.acceptance:
            self.acceptance[name].relax(keep)

    def record(self, arm: Arm, batch: int, seconds: float, draft_seconds: float,
               num_accepted: np.ndarray | None, emitted: int, catch_up_seconds: float = 0.0,
               timed: bool = True) -> None:
        """After a step with ``arm``: its wall time, the drafter's proposal and catch-up times within
        it and, when drafting, the accepted drafts per row. ``timed=False``: the times measured
        something else too (a CUDA graph's capture): learn the acceptance, not the costs."""
        tokens = 1 if arm.drafter is None else arm.k + 1
        if timed:
            self.cost.record_target(batch, tokens, seconds - draft_seconds - catch_up_seconds)
        if arm.drafter is not None:
            if timed:
                self.cost.record_draft(arm.drafter, batch, arm.k, draft_seconds)
            if catch_up_seconds > 0 and arm.drafter in self._prefill_pending:
                self._prefill_pending.discard(arm.drafter)
            elif catch_up_seconds > 0 and timed:
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
