"""Oracles for the what-if comparison: policies that see what no engine can, to show what the gap
between ours and the hindsight-best static k is made of.

Each knows every row's true acceptance curve and the true step costs, and picks the arm of highest
expected value every step (judged without catch-up costs, which the rollout still charges: these
are references, not bounds):
* ``throughput``: the batch's expected tokens per second (ours' objective, with perfect estimates);
* ``critical row``: the expected progress per second of the row with the most tokens left (its true
  length, unknown to an engine until the row ends), ties to its lowest acceptance: the rollout ends when
  that row does;
* ``slowest row``: the expected progress per second of the row with the lowest acceptance, lengths
  unknown: what per-row acceptance estimates could reach at best without knowing the lengths.
"""

from __future__ import annotations

import numpy as np

from ...engine.controller import OFF, Arm
from .acceptance import chain_tau
from .policies import ArPolicy
from .rollout import DRAFTER, Draws, World


OBJECTIVES = ("throughput", "critical row", "slowest row")


class OraclePolicy(ArPolicy):
    drafts = True

    def __init__(self, objective: str = "throughput") -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.objective, self.name = objective, f"what-if: oracle, {objective}"

    def start(self, world: World, rl_step: int, draws: Draws) -> None:
        self.world, self.draws = world, draws
        ks = range(1, world.max_k + 1)
        self.blocks = np.array([[1.0] + [chain_tau(rates, k) for k in ks] for rates in draws.rates])

    def see_rows(self, active: np.ndarray, generated: np.ndarray) -> None:
        self.active, self.generated = active, generated

    def choose(self, batch: int) -> Arm:
        costs, active, draws = self.world.costs, self.active, self.draws
        context = float((draws.prompts[active] + self.generated[active]).sum())
        seconds = [costs.target(batch, 1, context)]
        seconds += [costs.chain_step(batch, k, context)[0] for k in range(1, self.world.max_k + 1)]
        if self.objective == "throughput":
            tokens = self.blocks[active].sum(axis=0)
        elif self.objective == "slowest row":
            tokens = self.blocks[active[np.argmin(self.blocks[active, -1])]]
        else:
            left = draws.budgets[active] - self.generated[active]
            longest = active[left == left.max()]
            tokens = self.blocks[longest[np.argmin(self.blocks[longest, -1])]]
        best = int(np.argmax(tokens / np.array(seconds)))
        return OFF if best == 0 else Arm(DRAFTER, best)
