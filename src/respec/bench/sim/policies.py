"""The policies compared on a simulated world: who picks off or (eagle, k) before each decode step.

* ``AR``: always off.
* ``static k``: always (eagle, k).
* ``threshold``: (eagle, k) while the active batch is at most ``threshold`` (32, TLT's rule), off above;
  k is the offline profile's best chain at batch 1.
* ``Solver``: the paper's: an offline profile of every arm's step time per batch size, acceptance as
  measured when profiling (the first rollout), and one arm per batch size for good.
* ``ours``: ``respec.engine.controller.AdaptiveController`` itself, fed the simulated step times and
  accepted counts exactly as the engine feeds it (``Engine._decode_step``), its cost model starting
  from a roofline profile off by a few percent, timed at the engine's profile context.

The offline profiles (Solver, threshold) are the roofline at the first rollout's token-weighted mean
context, each (batch bucket, arm) cell off by the same few percent: an informed profile.
"""

from __future__ import annotations

import numpy as np

from ...engine.controller import OFF, AdaptiveController, Arm
from ...engine.cost_model import CostModel
from ...engine.profile import PROFILE_CONTEXT, batch_grid
from ...engine.speculation import ControllerConfig
from .acceptance import chain_tau
from .rollout import DRAFTER, Draws, StepOutcome, World

PROFILE_ERROR = 0.03  # lognormal sd of a profiled cell against the truth


class ArPolicy:
    name = "AR"
    drafts = False  # plain decoding: no drafter loaded, nothing shadowed

    def start(self, world: World, rl_step: int, draws: Draws) -> None:
        pass

    def choose(self, batch: int) -> Arm:
        return OFF

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def keeps_warm(self) -> bool:
        """A policy that drafts at some batch keeps the idle head in sync."""
        return True

    def absorbed(self) -> None:
        pass


class StaticPolicy(ArPolicy):
    drafts = True

    def __init__(self, k: int) -> None:
        self.arm, self.name = Arm(DRAFTER, k), f"static k={k}"

    def choose(self, batch: int) -> Arm:
        return self.arm


def profile_context(draws: Draws) -> float:
    """Cached tokens per row averaged over every row-step of plain decoding."""
    budgets = draws.budgets.astype(np.float64)
    return float((budgets * (draws.prompts + budgets / 2)).sum() / budgets.sum())


def offline_goodputs(world: World, rates: np.ndarray, context_per_row: float, error: float,
                     seed: int) -> np.ndarray:
    """Predicted tokens/s ``[batch 1..rows, arms off, k = 1..max_k]`` from an offline profile."""
    rows, ks, costs = world.workload.rows, range(1, world.max_k + 1), world.costs
    grid = np.array(batch_grid(rows))
    errors = np.exp(error * np.random.default_rng([seed, 7]).standard_normal((len(grid), 1 + world.max_k)))
    out = np.zeros((rows, 1 + world.max_k))
    for batch in range(1, rows + 1):
        context = batch * context_per_row
        seconds = [costs.target(batch, 1, context)] + [costs.chain_step(batch, k, context)[0] for k in ks]
        tokens = [1.0] + [chain_tau(rates, k) for k in ks]
        cell = errors[int(np.abs(np.log2(grid) - np.log2(batch)).argmin())]
        out[batch - 1] = batch * np.array(tokens) / (np.array(seconds) * cell)
    return out


class SolverPolicy(ArPolicy):
    """One arm per batch size, fixed after profiling (acceptance measured on the first rollout)."""

    name = "Solver (paper)"
    drafts = True

    def __init__(self, error: float = PROFILE_ERROR, seed: int = 0) -> None:
        self.error, self.seed, self.arms = error, seed, None

    def start(self, world: World, rl_step: int, draws: Draws) -> None:
        if self.arms is None:
            goodputs = offline_goodputs(world, draws.rates.mean(axis=0), profile_context(draws), self.error, self.seed)
            self.arms = [OFF if best == 0 else Arm(DRAFTER, int(best)) for best in goodputs.argmax(axis=1)]

    def choose(self, batch: int) -> Arm:
        return self.arms[min(batch, len(self.arms)) - 1]

    def keeps_warm(self) -> bool:
        return any(arm.drafter is not None for arm in self.arms)


class ThresholdPolicy(ArPolicy):
    """Speculation with one k up to a batch size, off above (TLT switches SD off above batch 32)."""

    drafts = True

    def __init__(self, threshold: int = 32, error: float = PROFILE_ERROR, seed: int = 0) -> None:
        self.threshold, self.error, self.seed, self.arm = threshold, error, seed, None
        self.name = f"threshold (off above {threshold})"

    def start(self, world: World, rl_step: int, draws: Draws) -> None:
        if self.arm is None:
            goodputs = offline_goodputs(world, draws.rates.mean(axis=0), profile_context(draws), self.error, self.seed)
            self.arm = Arm(DRAFTER, int(goodputs[0, 1:].argmax()) + 1)
            self.name = f"threshold (k={self.arm.k}, off above {self.threshold})"

    def choose(self, batch: int) -> Arm:
        return self.arm if batch <= self.threshold else OFF


def roofline_profile(world: World, max_tokens: int, error: float, seed: int) -> tuple[list[int], np.ndarray]:
    """The engine's start-up profile as the GPU would time it: target forwards at the engine's
    profile context on the batch grid, each cell off by ``error`` (lognormal sd)."""
    batches = batch_grid(world.workload.rows)
    truth = np.array([[world.costs.target(b, t, b * PROFILE_CONTEXT) for t in range(1, max_tokens + 1)]
                      for b in batches])
    return batches, truth * np.exp(error * np.random.default_rng([seed, 11]).standard_normal(truth.shape))


class OursPolicy(ArPolicy):
    """The production adaptive controller, one instance kept across the world's rollouts (as the
    engine keeps it across ``generate`` calls)."""

    name = "ours (AdaptiveController)"
    drafts = True

    def __init__(self, config: ControllerConfig | None = None, error: float = PROFILE_ERROR, seed: int = 0) -> None:
        self.config = config or ControllerConfig(seed=seed, profile_cache="")
        self.error, self.seed = error, seed
        self.controller: AdaptiveController | None = None

    def start(self, world: World, rl_step: int, draws: Draws) -> None:
        if self.controller is None:
            batches, table = roofline_profile(world, max(self.config.ks) + 1, self.error, self.seed)
            cost = CostModel(batches, table, decay=self.config.tuning.cost_decay)
            self.controller = AdaptiveController(self.config, {DRAFTER: "target"}, cost)
        elif world.drift.publishes:  # the online learner published new weights since the last rollout
            self.controller.drafter_updated(DRAFTER)
        self.controller.drafters_synced()  # the engine says so after prefilling fresh rows
        self.controller.prefill_pending(DRAFTER)  # ... and that the head deferred their prompts' prefill

    def choose(self, batch: int) -> Arm:
        return self.controller.choose(batch)

    def observe(self, o: StepOutcome) -> None:
        self.controller.record(o.arm, o.batch, o.seconds, o.draft_seconds, o.accepted, o.emitted, o.catch_up_seconds)
        if o.arm.drafter is None:  # the engine reports an idle drafter's lag after each step it sat out
            self.controller.drafter_lag(DRAFTER, o.lag)

    def keeps_warm(self) -> bool:
        return self.controller.keeps_warm(DRAFTER)

    def absorbed(self) -> None:
        self.controller.drafter_synced(DRAFTER)
