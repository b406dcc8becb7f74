"""The simulated GPU world: calibration against the published points, reproducibility, the production
controller in the loop, the AR clock against its analytic sum, and a negative control."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from respec.bench.sim import calibrate
from respec.bench.sim.acceptance import CURVES, DRIFTS, chain_tau, tree_tau
from respec.bench.sim.compare import expected_bound, run_world, summarize
from respec.bench.sim.hardware import (
    GPUS,
    H100_EFFICIENCY,
    MODELS,
    PAPER_STACK,
    SGLANG_STACK,
    StepCosts,
)
from respec.bench.sim.oracles import OraclePolicy
from respec.bench.sim.policies import (
    ArPolicy,
    OursPolicy,
    SolverPolicy,
    StaticPolicy,
    ThresholdPolicy,
    roofline_profile,
)
from respec.bench.sim.rollout import DRAFTER, Draws, StepOutcome, World, run_rollout
from respec.bench.sim.workload import Workload
from respec.engine.controller import AdaptiveController
from respec.engine.cost_model import CostModel

SMALL = Workload(rows=16, median=160, sigma=0.8, max_len=768, prompt_min=64, prompt_max=128)


def small_world(stack=SGLANG_STACK, curve="paper-fit", drift="frozen-paper", workload=SMALL, **options) -> World:
    costs = StepCosts(GPUS["H100"], MODELS["qwen2.5-7b"], stack)
    return World("small", costs, CURVES[curve], DRIFTS[drift], workload, rl_steps=(0, 100), **options)


def test_the_named_paper_points_are_reproduced_within_15_percent():
    rows = calibrate.calibration_rows()
    named = [r for r in rows if r["named"]]
    assert [(r["batch"], r["published"]) for r in named] == [(1, 1.411), (2, 1.464), (32, 0.755), (64, 0.843)]
    for row in named:
        assert abs(row["error"]) <= calibrate.TOLERANCE, row
    assert abs(rows[-4]["error"]) < 0.01  # SGLang's plain decoding speed sets the launch overhead


def test_the_stored_constants_are_what_the_fit_finds():
    x = calibrate.fit_paper_stack()
    costs, rates = calibrate.paper_costs(x)
    assert costs.eff.compute == pytest.approx(H100_EFFICIENCY.compute, rel=0.02)
    assert costs.eff.launch_s == pytest.approx(H100_EFFICIENCY.launch_s, rel=0.02)
    assert costs.stack.head_launch_s == pytest.approx(PAPER_STACK.head_launch_s, rel=0.05)
    assert costs.stack.step_overhead_s == pytest.approx(PAPER_STACK.step_overhead_s, rel=0.05)
    assert rates[0] == pytest.approx(CURVES["paper-fit"][0], abs=0.01)
    assert calibrate.fit_sglang_stack() == pytest.approx(SGLANG_STACK.head_launch_s, rel=0.05)


def test_a_chain_is_the_one_wide_tree_and_siblings_only_add():
    rates = CURVES["paper-fit"]
    for k in (1, 3, 5):
        assert tree_tau(rates, k, 1, k + 1) == pytest.approx(chain_tau(rates, k))
    assert tree_tau(rates, 5, 8, 32) > tree_tau(rates, 5, 8, 8) > chain_tau(rates, 5)


def test_the_roofline_is_memory_bound_at_batch_1_and_compute_bound_for_wide_verifies():
    costs = StepCosts(GPUS["H100"], MODELS["qwen2.5-7b"], SGLANG_STACK)
    assert costs.target(1, 8, 1024) == pytest.approx(costs.target(1, 1, 1024), rel=0.01)  # weights dominate
    assert costs.target(64, 8, 64 * 1024) > 1.5 * costs.target(64, 1, 64 * 1024)  # 512 tokens per forward
    assert costs.target(64, 32, 64 * 1024) > 6 * costs.target(64, 1, 64 * 1024)  # 2048: compute bound
    assert costs.target(8, 1, 8 * 16384) > 1.2 * costs.target(8, 1, 8 * 256)  # long contexts read the KV cache


def test_the_same_seed_gives_the_same_rollouts_and_another_seed_does_not():
    world = small_world()
    first, again = summarize(world, run_world(world)), summarize(world, run_world(world))
    assert first == again
    other = summarize(replace(world, seed=1), run_world(replace(world, seed=1)))
    assert other["ar_seconds"] != first["ar_seconds"]


def test_common_random_numbers_one_policy_does_not_change_what_another_sees():
    world = small_world()
    draws = Draws.make(world, 0)
    alone = run_rollout(world, StaticPolicy(3), 0, draws)
    run_rollout(world, OursPolicy(), 0, draws)
    after = run_rollout(world, StaticPolicy(3), 0, draws)
    assert (alone.seconds, alone.ks, alone.accepted) == (after.seconds, after.ks, after.accepted)


def test_ar_time_is_the_analytic_sum_of_its_steps():
    world = small_world(noise=0.0)
    draws = Draws.make(world, 0)
    result = run_rollout(world, ArPolicy(), 0, draws)
    costs, left = world.costs, draws.budgets - 1
    expected = costs.target(len(draws.prompts), float(draws.prompts.mean()), 0.0)
    for step in range(int(left.max())):
        rows = left > step
        expected += costs.target(int(rows.sum()), 1, float((draws.prompts[rows] + 1 + step).sum()))
    assert result.seconds == pytest.approx(expected, rel=1e-12)
    assert result.steps == int(left.max()) and result.tokens == int(left.sum())


class Recording(OursPolicy):
    """Ours, keeping every input the controller got."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log: list[tuple] = []

    def start(self, world, rl_step, draws) -> None:
        super().start(world, rl_step, draws)
        self.log.append(("start", world.drift.publishes and len(self.log) > 0))

    def choose(self, batch: int):
        arm = super().choose(batch)
        self.log.append(("choose", batch, arm))
        return arm

    def observe(self, outcome: StepOutcome) -> None:
        super().observe(outcome)
        self.log.append(("observe", outcome))

    def absorbed(self) -> None:
        super().absorbed()
        self.log.append(("absorbed",))


def replay(policy: Recording, world: World, seed: int) -> tuple[int, int]:
    """Drive a fresh AdaptiveController by hand with the inputs the policy passed on (profile, steps,
    drafter events); returns (decisions, how many differ from the policy's)."""
    batches, table = roofline_profile(world, max(policy.config.ks) + 1, policy.error, policy.seed)
    by_hand = AdaptiveController(replace(policy.config, seed=seed), {DRAFTER: "target"},
                                 CostModel(batches, table, decay=policy.config.tuning.cost_decay))
    decisions = differ = 0
    for event in policy.log:
        if event[0] == "start":
            if event[1]:
                by_hand.drafter_updated(DRAFTER)
            by_hand.drafters_synced()
            by_hand.prefill_pending(DRAFTER)
        elif event[0] == "absorbed":
            by_hand.drafter_synced(DRAFTER)
        elif event[0] == "choose":
            differ += by_hand.choose(event[1]) != event[2]
            decisions += 1
        else:
            o = event[1]
            by_hand.record(o.arm, o.batch, o.seconds, o.draft_seconds, o.accepted, o.emitted, o.catch_up_seconds)
            if o.arm.drafter is None:
                by_hand.drafter_lag(DRAFTER, o.lag)
    return decisions, differ


@pytest.mark.parametrize("drift", ["frozen-paper", "online-held"])
def test_ours_is_the_production_controller_deciding_as_it_does_by_hand(drift):
    """The policy holds the engine's AdaptiveController itself, and the same inputs give the same
    decision at every step; a controller seeded differently (negative control) departs from them."""
    world = small_world(stack=PAPER_STACK, drift=drift)
    policy = Recording(seed=3)
    for rl_step in world.rl_steps:
        run_rollout(world, policy, rl_step)
    assert type(policy.controller) is AdaptiveController
    assert len({e[2] for e in policy.log if e[0] == "choose"}) > 1
    decisions, differ = replay(policy, world, seed=3)
    assert decisions > 300 and differ == 0
    assert replay(policy, world, seed=4)[1] > 0


def test_negative_control_long_drafts_lose_to_ar_at_large_batch():
    """256 rows that all stay to the end (no tail): k = 8 verifies 2304 tokens a step, compute bound,
    with the weak gsm8k head: slower than plain decoding. The Solver, which prices it, never drafts (it
    pays only for keeping the idle head warm)."""
    flat = Workload(rows=256, median=256, sigma=0.0, max_len=256, prompt_min=128, prompt_max=128)
    world = small_world(curve="ours-gsm8k", drift="none", workload=flat)
    draws = Draws.make(world, 0)
    ar, bad = (run_rollout(world, p, 0, draws).seconds for p in (ArPolicy(), StaticPolicy(8)))
    assert bad > 1.5 * ar
    solver = run_rollout(world, SolverPolicy(), 0, draws)
    # It never drafts here; it keeps the idle head warm for the small batches where it would.
    assert solver.drafted == 0 and solver.seconds - solver.absorb_seconds <= 1.02 * ar


def test_an_idle_head_that_absorbs_its_shadow_never_needs_a_target_reread():
    """As in the engine, full shadow blocks go through the head while it sits out, so switching on
    costs a short extend; plain decoding, which has no head, pays nothing for it."""
    absorbing = small_world(shadow_limit=16)
    lagging = replace(absorbing, head_absorbs=False)
    late = [run_rollout(w, ThresholdPolicy(threshold=2), 0) for w in (lagging, absorbing)]
    assert late[1].catch_up_seconds < 0.2 * late[0].catch_up_seconds
    assert late[1].absorb_seconds > 0 and late[0].absorb_seconds == 0
    assert run_rollout(lagging, ArPolicy(), 0).seconds == run_rollout(absorbing, ArPolicy(), 0).seconds


def test_ours_absorbs_only_while_its_controller_keeps_the_head_warm():
    """Ours asks the production controller (``keeps_warm``): a head that pays at the tail is kept in
    sync; one that never pays (drafting costs ten AR steps here) is left to lag, at no cost."""
    wide = Workload(rows=256, median=160, sigma=0.8, max_len=768, prompt_min=64, prompt_max=128)
    world = small_world(shadow_limit=16, workload=wide)  # off at 256 rows, drafting in the tail
    assert run_rollout(world, OursPolicy(), 0).absorb_seconds > 0
    costly = replace(world, costs=replace(world.costs, stack=replace(world.costs.stack, head_launch_s=0.1)))
    assert run_rollout(costly, OursPolicy(), 0).absorb_seconds == 0


def test_the_drafting_free_bound_is_above_every_policy():
    world = small_world()
    summary = summarize(world, run_world(world))
    bound = sum(expected_bound(world, Draws.make(world, s), drafting=False) for s in world.rl_steps)
    assert summary["ar_seconds"] / bound >= max(row["vs_ar"] for row in summary["policies"])


def test_a_frozen_drafter_drifts_and_an_online_one_does_not():
    rates = CURVES["paper-fit"]
    frozen, held = DRIFTS["frozen-paper"], DRIFTS["online-held"]
    assert chain_tau(frozen.rates_at(rates, 100), 4) == pytest.approx(0.6 * chain_tau(rates, 4), rel=1e-3)
    assert chain_tau(frozen.rates_at(rates, 50), 4) == pytest.approx(0.8 * chain_tau(rates, 4), rel=1e-3)
    assert np.allclose(held.rates_at(rates, 100), rates, atol=1e-6)


def test_response_lengths_are_long_tailed_and_capped():
    prompts, lengths = Workload(rows=4000).draw(np.random.default_rng(0))
    assert lengths.max() == 8192 and 0.02 < np.mean(lengths == 8192) < 0.08
    assert np.median(lengths) == pytest.approx(1500, rel=0.1) and lengths.mean() > 1.3 * np.median(lengths)
    assert prompts.min() >= 128 and prompts.max() <= 512


def test_the_oracles_see_the_rows_and_the_critical_one_follows_the_longest_row():
    """What-if oracles (bench/sim/oracles.py): with the true rates and costs, the throughput oracle is
    at least as fast as any static k on a world of identical rows; the critical-row oracle picks the arm
    that is best for the row with the most tokens left, not for the batch."""
    world = small_world(row_spread=0.0, drift="none")
    draws = Draws.make(world, 0)
    oracle = run_rollout(world, OraclePolicy("throughput"), 0, draws).seconds
    assert oracle <= 1.01 * min(run_rollout(world, StaticPolicy(k), 0, draws).seconds for k in (1, 2, 3, 4))
    critical = OraclePolicy("critical row")
    critical.start(world, 0, draws)
    critical.blocks[:, 1:] = 1.0  # every row's drafts always rejected ...
    longest = int(np.argmax(draws.budgets))
    critical.blocks[longest, 1:] = 1.0 + np.arange(1, world.max_k + 1)  # ... but the longest row's always accepted
    throughput = OraclePolicy("throughput")
    throughput.start(world, 0, draws)
    throughput.blocks = critical.blocks
    for policy in (critical, throughput):
        policy.see_rows(np.arange(len(draws.budgets)), np.ones(len(draws.budgets), dtype=np.int64))
    batch = len(draws.budgets)
    assert critical.choose(batch).drafter is not None and throughput.choose(batch).drafter is None
    slowest = OraclePolicy("slowest row")
    slowest.start(world, 0, draws)
    slowest.blocks[:, 1:] = 1.0 + np.arange(1, world.max_k + 1)  # every row's drafts accepted ...
    slowest.blocks[3, 1:] = 1.0  # ... but row 3's never: the slowest row gains nothing from drafting
    slowest.see_rows(np.arange(batch), np.ones(batch, dtype=np.int64))
    assert slowest.choose(batch).drafter is None
    with pytest.raises(ValueError, match="objective"):
        OraclePolicy("makespan")
