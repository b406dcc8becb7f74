"""Every policy on the same rollouts of a world, the headroom bounds, and the table.

Each of the world's rollouts (one per simulated RL step) is drawn once (``Draws``) and decoded by
every policy; the policies that learn (ours) or profile once (Solver, threshold) keep their state
from one rollout to the next, as an engine does across RL steps.

Two bounds per world, from expected blocks (each row advances by its own expected block per step,
no luck) with the best arm chosen every step by expected tokens/s:
* ``bound, drafting free``: verify costs only, drafting and the stack's per-step cost free (the
  definition of ``bench/headroom.py``, here with the KV cache's context): no drafter of this
  acceptance can beat it on this target and GPU;
* ``bound, drafting paid``: every arm's full simulated cost: what a controller that knew the world
  would reach (a reference, not a strict bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .acceptance import chain_tau
from .policies import ArPolicy, OursPolicy, SolverPolicy, StaticPolicy, ThresholdPolicy
from .rollout import Draws, Policy, RolloutResult, World, prefill_seconds, run_rollout


@dataclass
class PolicyRun:
    policy: Policy
    results: list[RolloutResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def seconds(self) -> float:
        return float(sum(r.seconds for r in self.results))


def default_policies(world: World) -> list[Policy]:
    statics = [StaticPolicy(k) for k in range(1, world.max_k + 1)]
    return [ArPolicy(), *statics, ThresholdPolicy(seed=world.seed), SolverPolicy(seed=world.seed),
            OursPolicy(seed=world.seed)]


def run_world(world: World, policies: list[Policy] | None = None) -> list[PolicyRun]:
    runs = [PolicyRun(p) for p in (policies or default_policies(world))]
    for rl_step in world.rl_steps:
        draws = Draws.make(world, rl_step)
        for run in runs:
            run.results.append(run_rollout(world, run.policy, rl_step, draws))
    return runs


def expected_bound(world: World, draws: Draws, drafting: bool) -> float:
    """Seconds of one rollout with expected blocks and the best arm each step (see the module doc)."""
    costs, ks = world.costs, range(1, world.max_k + 1)
    blocks = np.stack([np.ones(len(draws.budgets))] + [[chain_tau(r, k) for r in draws.rates] for k in ks])
    remaining = draws.budgets.astype(np.float64) - 1
    seconds = prefill_seconds(costs, draws.prompts)
    while np.any(remaining > 1e-9):
        active = remaining > 1e-9
        batch = int(active.sum())
        context = float((draws.prompts + draws.budgets - remaining)[active].sum())
        step = [costs.target(batch, 1, context)]
        step += [costs.chain_step(batch, k, context)[0] if drafting else costs.target(batch, k + 1, context) for k in ks]
        emitted = np.minimum(remaining[active][None, :], blocks[:, active]).sum(axis=1)
        best = int(np.argmax(emitted / np.array(step)))
        remaining[active] = np.maximum(remaining[active] - blocks[best, active], 0.0)
        seconds += step[best]
    return seconds


def world_bounds(world: World) -> dict[str, list[float]]:
    """Seconds of each rollout of the world under each bound."""
    out: dict[str, list[float]] = {"drafting free": [], "drafting paid": []}
    for rl_step in world.rl_steps:
        draws = Draws.make(world, rl_step)
        out["drafting free"].append(expected_bound(world, draws, drafting=False))
        out["drafting paid"].append(expected_bound(world, draws, drafting=True))
    return out


def accept_len(results: list[RolloutResult]) -> float:
    """Tokens per row per speculative step over all the rollouts (0 when none speculated)."""
    rows = sum(b for r in results for b, k in zip(r.batches, r.ks) if k)
    return (sum(r.accepted for r in results) + rows) / rows if rows else 0.0


def summarize(world: World, runs: list[PolicyRun], bounds: dict[str, list[float]] | None = None) -> dict:
    """The world's table as plain data: per policy the total time and its ratios."""
    ar = next(r for r in runs if type(r.policy) is ArPolicy)
    statics = [r for r in runs if isinstance(r.policy, StaticPolicy)]
    best_static = min(statics, key=lambda r: r.seconds)
    rows = []
    for run in runs:
        spec_steps = sum(sum(1 for k in r.ks if k) for r in run.results)
        rows.append({"policy": run.name, "seconds": run.seconds, "vs_ar": ar.seconds / run.seconds,
                     "vs_best_static": best_static.seconds / run.seconds,
                     "per_rollout_vs_ar": [a.seconds / r.seconds for a, r in zip(ar.results, run.results)],
                     "accept_len": accept_len(run.results),
                     "spec_step_share": spec_steps / max(sum(r.steps for r in run.results), 1)})
    out = {"world": world.name, "rl_steps": list(world.rl_steps), "best_static": best_static.name, "policies": rows,
           "ar_seconds": ar.seconds}
    if bounds:
        out["bounds_vs_ar"] = {name: {"total": ar.seconds / sum(seconds),
                                      "per_rollout": [a.seconds / b for a, b in zip(ar.results, seconds)]}
                               for name, seconds in bounds.items()}
    return out


def format_world(summary: dict) -> str:
    steps = ", ".join(str(s) for s in summary["rl_steps"])
    lines = [f"| policy | rollout s (RL steps {steps}) | vs AR | vs best static | vs AR per rollout | tau | SD steps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["policies"]:
        per = " / ".join(f"{v:.2f}" for v in row["per_rollout_vs_ar"])
        tau = f"{row['accept_len']:.2f}" if row["accept_len"] else "-"
        lines.append(f"| {row['policy']} | {row['seconds']:.1f} | {row['vs_ar']:.3f}x | {row['vs_best_static']:.3f}x | "
                     f"{per} | {tau} | {row['spec_step_share']:.0%} |")
    for name, ratio in summary.get("bounds_vs_ar", {}).items():
        per = " / ".join(f"{v:.2f}" for v in ratio["per_rollout"])
        lines.append(f"| bound, {name} | | {ratio['total']:.3f}x | | {per} | | |")
    return "\n".join(lines)
