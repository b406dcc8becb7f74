"""The adaptive SD controller: acceptance and cost estimates, decisions, switching, and that it changes
only speed (greedy outputs with it equal greedy AR, whatever arm each step takes)."""

from __future__ import annotations

import numpy as np
import pytest

from respec import LLM, SamplingParams
from respec.engine.acceptance import AcceptanceEstimate
from respec.engine.controller import OFF, AdaptiveController, Arm, StaticController
from respec.engine.cost_model import SPIKE, CostModel
from respec.engine.drafters import DraftModelDrafter, EagleDrafter
from respec.engine.profile import batch_grid
from respec.engine.speculation import DEFAULT_K, ControllerConfig, ControllerTuning
from respec.engine.stats import StepRecord, summarize_trace
from respec.models.loading import load_model
from tests.helpers import ragged_prompts, random_head

MAX_K = 4


def linear_cost(per_row: float = 1e-3, fixed: float = 10e-3, max_batch: int = 64, max_k: int = MAX_K) -> CostModel:
    """A synthetic profile: a step costs ``fixed`` plus ``per_row`` per row-token (memory-bound at small
    batch, compute-bound at large batch, as on real hardware)."""
    batches = batch_grid(max_batch)
    table = np.array([[fixed + per_row * b * t for t in range(1, max_k + 2)] for b in batches])
    return CostModel(batches, table)


def feed(controller: AdaptiveController, batch: int, steps: int, accepted: int,
         draft_step_s: float = 1e-3) -> list[Arm]:
    """Run the controller against the synthetic cost model's own times and a drafter that gets exactly
    ``accepted`` drafts right per row per step."""
    chosen = []
    for _ in range(steps):
        arm = controller.choose(batch)
        chosen.append(arm)
        draft = 0.0 if arm.drafter is None else draft_step_s * arm.k
        seconds = controller.cost._profiled(batch, 1 if arm.drafter is None else arm.k + 1) + draft
        hits = None if arm.drafter is None else np.full(batch, min(accepted, arm.k))
        emitted = batch if hits is None else int((hits + 1).sum())
        controller.record(arm, batch, seconds, draft, hits, emitted)
    return chosen


# ------------------------------------------------------------------------------------- pure estimates

def test_expected_emitted_is_one_plus_sum_of_prefix_products():
    estimate = AcceptanceEstimate(4, memory=2.0, prior=0.5)
    estimate.accepted[:] = [8, 4, 2, 0]
    estimate.reached[:] = [9, 9, 5, 3]
    rates, prior = [], 0.5  # each position's prior pseudo-count is the rate of the position before
    for accepted, reached in zip([8, 4, 2, 0], [9, 9, 5, 3]):
        rates.append(prior := (accepted + prior) / (reached + 1))
    assert np.allclose(estimate.rates(), rates)
    assert estimate.expected_emitted(2) == pytest.approx(1 + rates[0] + rates[0] * rates[1])
    assert estimate.expected_emitted(4) == pytest.approx(1 + np.cumprod(rates).sum())


def test_a_position_never_reached_takes_the_rate_of_the_one_before():
    """A poor drafter's second draft is rarely reached: it must not keep the optimistic prior there,
    or k = 2 looks as good as the prior whatever the first position showed."""
    estimate = AcceptanceEstimate(2, memory=1000.0, prior=0.6)
    estimate.record(np.zeros(20, dtype=np.int64), 2)  # 20 rows, every first draft rejected
    first, second = estimate.rates()
    assert first == pytest.approx(0.6 / 21) and second == pytest.approx(first)
    draws = estimate.sample_rates(np.random.default_rng(0))
    assert draws.shape == (2,) and draws[0] < 0.3


def test_acceptance_counts_reached_and_accepted_per_position():
    estimate = AcceptanceEstimate(4, memory=40.0, prior=0.5)
    estimate.record(np.array([0, 2, 4, 1]), 4)
    assert estimate.reached.tolist() == [4, 3, 2, 1] and estimate.accepted.tolist() == [3, 2, 1, 1]
    estimate.record(np.array([0, 0, 0, 0]), 4)
    keep = np.exp(-4 / 40)  # four rows reached position 0: its past fades by four observations
    assert np.allclose(estimate.reached, [keep * 4 + 4, 3, 2, 1])  # the rest were not reached: kept


def test_a_position_the_controller_stops_reaching_keeps_its_evidence():
    """Running k = 1 says nothing about the second draft: its poor rate must not fade back to the
    prior (the first position's rate), or the controller returns to k = 2 again and again."""
    estimate = AcceptanceEstimate(2, memory=16.0, prior=0.5)
    for _ in range(40):  # k = 2: the first draft accepted half the time, the second one never
        estimate.record(np.array([1, 0]), 2)
    second = estimate.rates()[1]
    assert second < 0.1
    for _ in range(200):  # k = 1 for a long while
        estimate.record(np.array([1, 0]), 1)
    assert estimate.rates()[1] == pytest.approx(second, abs=0.02)


def test_acceptance_forgets_per_row_not_per_step():
    """Old evidence fades by the rows observed since: eight rows in one step or one row in eight steps."""
    batched, single = (AcceptanceEstimate(2, memory=16.0, prior=0.5) for _ in range(2))
    for estimate in (batched, single):
        estimate.record(np.full(8, 2), 2)  # eight rows, both drafts accepted
    batched.record(np.zeros(8, dtype=np.int64), 2)
    for _ in range(8):
        single.record(np.zeros(1, dtype=np.int64), 2)
    faded = 8 * np.exp(-8 / 16)
    assert batched.accepted[0] == pytest.approx(faded) and single.accepted[0] == pytest.approx(faded)


def test_cost_model_interpolates_and_learns_corrections():
    cost = linear_cost()
    assert cost.target_time(4, 1) == pytest.approx(0.014)
    assert cost.target_time(3, 1) == pytest.approx(0.013)  # linear between grid points
    assert cost.target_time(128, 1) == pytest.approx(0.074 * 2)  # linear past the grid
    for _ in range(50):
        cost.record_target(4, 1, 0.028)
    assert cost.target_time(4, 1) == pytest.approx(0.028, rel=1e-3)
    assert cost.target_time(4, 2) == pytest.approx(0.018)  # other entries keep their own correction
    assert cost.target_time(8, 1) == pytest.approx(0.018 * 2, rel=1e-3)  # borrowed from the nearest measured
    assert cost.draft_time("eagle", 4, 3) == 0.0  # never measured: optimistic
    cost.record_draft("eagle", 4, 3, 0.006)
    assert cost.draft_time("eagle", 4, 3) == pytest.approx(0.006)
    assert cost.draft_time("eagle", 64, 1) == pytest.approx(0.002)  # nearest measured bucket


def test_first_measurements_are_averaged_with_the_prior_then_weighted_exponentially():
    cost = linear_cost()
    cost.record_target(2, 3, 0.032)  # profiled 0.016: ratio 2, averaged with the prior ratio 1
    assert cost.target_time(2, 3) == pytest.approx(0.016 * 1.5)
    cost.record_target(2, 3, 0.016)
    assert cost.target_time(2, 3) == pytest.approx(0.016 * 4 / 3)  # the mean of 1, 2 and 1
    for _ in range(60):
        cost.record_target(2, 3, 0.016)
    assert cost.target_time(2, 3) == pytest.approx(0.016, rel=1e-3)  # then exponentially weighted


def test_one_stalled_step_moves_the_estimate_little_but_a_lasting_change_is_followed():
    cost = linear_cost()
    step = cost._profiled(4, 2)
    for _ in range(20):
        cost.record_target(4, 2, step)  # as profiled
    cost.record_target(4, 2, 3 * step)  # another tenant stalled this one step
    assert cost.target_time(4, 2) == pytest.approx(step * (1 + (1 - cost.decay) * (SPIKE - 1)))
    for _ in range(40):
        cost.record_target(4, 2, 2 * step)  # the step really became twice as slow
    assert cost.target_time(4, 2) == pytest.approx(2 * step, rel=0.05)


def test_profile_is_cached_on_disk(tiny_llama, tmp_path):
    model, _ = load_model(tiny_llama)
    first = CostModel.profile(model, 4, 3, cache_dir=tmp_path)
    assert first.table.shape == (3, 3) and (first.table > 0).all()
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    again = CostModel.profile(model, 4, 3, cache_dir=tmp_path)
    assert np.array_equal(again.table, first.table)


def test_profile_is_retaken_when_the_kernels_change(tiny_llama, tmp_path):
    from respec.models.linear import (
        clear_kernel_choices,
        kernel_choices,
        set_kernel_choices,
    )

    model, _ = load_model(tiny_llama)
    CostModel.profile(model, 4, 3, cache_dir=tmp_path)
    saved = kernel_choices()
    try:
        set_kernel_choices({(12345, 64, 1): "gemm"})  # another tuned table: the old timings no longer hold
        CostModel.profile(model, 4, 3, cache_dir=tmp_path)
    finally:
        clear_kernel_choices()
        set_kernel_choices(saved)
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


# ------------------------------------------------------------------------------------------ decisions

TUNING_FIELDS = set(ControllerTuning.__dataclass_fields__)


def controller(explore: bool = False, seed: int = 0, drafters=None, **kwargs) -> AdaptiveController:
    """``explore``: Thompson sampling (the default in use) or always the best predicted arm;
    ``kwargs``: ControllerConfig or ControllerTuning fields."""
    tuning = ControllerTuning(**{k: v for k, v in kwargs.items() if k in TUNING_FIELDS})
    config = ControllerConfig(max_draft_tokens=MAX_K, explore=explore, seed=seed, tuning=tuning,
                              **{k: v for k, v in kwargs.items() if k not in TUNING_FIELDS})
    return AdaptiveController(config, drafters or {"eagle": "none"}, linear_cost())


def test_speculates_at_small_batch_and_not_at_large_batch():
    """Fixed 10 ms + 1 ms per row-token: at batch 1 verifying k + 1 tokens is nearly free, so a drafter
    right 3 times in 4 pays; at batch 64 the step time grows with k + 1 and speculation does not."""
    small = controller()
    arms = feed(small, 1, 40, accepted=3)
    assert all(arm.drafter == "eagle" for arm in arms[-10:]) and arms[-1].k >= 3
    large = controller()
    arms = feed(large, 64, 40, accepted=1)
    assert arms[-10:] == [OFF] * 10


def test_stale_drafter_is_switched_off_by_itself():
    ctl = controller()
    assert feed(ctl, 2, 30, accepted=4)[-1].drafter == "eagle"
    arms = feed(ctl, 2, 60, accepted=0)  # the actor moved on: nothing is accepted any more
    assert arms[-10:] == [OFF] * 10


def test_prefers_the_drafter_that_is_accepted():
    ctl = controller(drafters={"eagle": "none", "ngram": "none"})
    chosen = []
    for _ in range(60):
        arm = ctl.choose(1)
        chosen.append(arm)
        hits = None if arm.drafter is None else np.array([min(arm.k, 3 if arm.drafter == "eagle" else 0)])
        seconds = ctl.cost._profiled(1, arm.k + 1)
        ctl.record(arm, 1, seconds, 0.0, hits, 1 if hits is None else int(hits.sum()) + 1)
    assert all(arm.drafter == "eagle" for arm in chosen[-10:])


def test_decisions_are_deterministic_for_a_seed():
    runs = [feed(controller(True, seed=7), 8, 60, accepted=2) for _ in range(2)]
    assert runs[0] == runs[1]
    assert feed(controller(True, seed=8), 8, 60, accepted=2) != runs[0]


def test_exploration_skips_arms_predicted_far_below_the_best():
    """At batch 64 speculation loses by far: exploration must not keep paying for it, even with cost
    draws wide enough to make an unmeasured arm look cheap now and then (the negative control lets
    every arm be explored and then does buy them)."""
    ctl = controller(True, cost_spread=2.0)
    assert feed(ctl, 64, 200, accepted=0)[-100:] == [OFF] * 100
    wide = controller(True, cost_spread=2.0, explore_margin=1.0)  # every arm may be explored
    assert any(arm.drafter is not None for arm in feed(wide, 64, 200, accepted=0)[-100:])


def test_a_drafter_that_sat_out_long_is_judged_near_without_its_catch_up():
    """Its catch-up cost grows with every step it sits out: it is judged for exploration without that
    cost (the goodput it would have once switched on), so it stays among the arms drawn from."""
    ctl = controller(True, drafters={"eagle": "target"})
    for _ in range(20):
        ctl.acceptance["eagle"].record(np.full(4, 2), 2)  # two drafts of two accepted, every time
    ctl.missed["eagle"] = ctl.reread["eagle"] = 500
    eagle = Arm("eagle", 2)
    assert ctl.goodput(eagle, 4) < 0.5 * ctl.goodput(OFF, 4)
    assert ctl.goodput(eagle, 4, switching=False) > ctl.goodput(OFF, 4)


def test_thompson_retries_a_drafter_that_two_rejections_would_lock_out():
    """With a thin prior (one row-step), choosing on the posterior mean gives up on a drafter after
    two unlucky steps (at batch 2 here); a Thompson draw keeps trying it while it may well be the
    better arm."""
    greedy, thompson = controller(prior_weight=1.0), controller(True, seed=1, prior_weight=1.0)
    for ctl in (greedy, thompson):
        for _ in range(2):
            ctl.acceptance["eagle"].record(np.zeros(2, dtype=np.int64), 1)
    assert [greedy.choose(2) for _ in range(50)] == [OFF] * 50
    tried = sum(thompson.choose(2).drafter is not None for _ in range(50))
    assert 5 <= tried < 50


def test_thompson_retries_off_after_slow_steps_priced_it_too_high():
    """Two off steps at twice their real cost price off below a drafter whose drafts are all rejected.
    Drawing the rates alone never runs off again (it has none to draw); drawing the costs as well
    retries it while its cell has few measurements, and the retries find its real cost."""
    last_off = {}
    for spread in (0.0, 0.15):
        ctl = controller(True, seed=3, cost_spread=spread)
        for _ in range(2):
            ctl.record(OFF, 8, 2 * ctl.cost._profiled(8, 1), 0.0, None, 8)
        arms = feed(ctl, 8, 300, accepted=0)
        last_off[spread] = sum(arm == OFF for arm in arms[-100:])
    assert last_off[0.0] == 0
    assert last_off[0.15] >= 90


def test_a_fresh_set_of_rows_leaves_nothing_to_catch_up(target):
    """Each generate call prefills every drafter for its rows: what a drafter missed in the previous
    call is not charged again as a catch-up."""
    model, tokenizer = target
    llm = LLM(model, tokenizer=tokenizer, drafter=["ngram"],
              speculative=ControllerConfig(k_choices=(1,), max_draft_tokens=1, profile_cache=""), max_num_seqs=2)
    ctl = llm.engine.controller
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    llm.generate([[3, 4, 5]], params, progress=False)
    ctl.missed["ngram"] = ctl.reread["ngram"] = 7.0  # as if it sat out the end of that call
    seen, choose = [], ctl.choose
    ctl.choose = lambda batch: seen.append((ctl.missed["ngram"], ctl.reread["ngram"])) or choose(batch)
    llm.generate([[6, 7, 8]], params, progress=False)
    assert seen[0] == (0.0, 0.0)


def test_a_new_drafter_version_relaxes_its_acceptance_estimate():
    ctl = controller()
    feed(ctl, 2, 60, accepted=0)  # the old version was never accepted
    stale = ctl.expected_emitted(Arm("eagle", 4))
    ctl.drafter_updated("eagle")
    assert ctl.expected_emitted(Arm("eagle", 4)) > stale
    ctl.drafter_updated("unknown")  # not one of its drafters: ignored


def test_switch_on_cost_is_charged_and_spread():
    ctl = controller(drafters={"eagle": "target"}, switch_horizon=4)
    ctl.missed["eagle"] = ctl.reread["eagle"] = 20
    arm = Arm("eagle", 2)
    catch_up = ctl.cost.catch_up_time("target", "eagle", 8, 20)
    assert catch_up == pytest.approx(ctl.cost._profiled(8, 20))
    assert ctl.switch_time(arm, 8) == pytest.approx(catch_up)
    seconds = ctl.predicted_time(arm, 8) + catch_up / 4
    assert ctl.goodput(arm, 8) == pytest.approx(8 * ctl.expected_emitted(arm) / seconds)


def test_a_shadowed_drafter_pays_only_its_own_extend_pass():
    """A drafter kept up while it sat out (lag 0) re-reads nothing from the target when switched on."""
    ctl = controller(drafters={"eagle": "target"})
    ctl.cost.record_draft("eagle", 8, 1, 0.002)
    for _ in range(40):
        ctl.record(OFF, 8, 0.02, 0.0, None, 8)
    reread_all = ctl.switch_time(Arm("eagle", 2), 8)
    ctl.drafter_lag("eagle", 0)
    own = ctl.switch_time(Arm("eagle", 2), 8)
    assert own == pytest.approx(0.002 * ctl.cost._profiled(8, 40) / ctl.cost._profiled(8, 1))
    assert reread_all == pytest.approx(ctl.cost._profiled(8, 40) + own)


def test_an_idle_drafter_is_kept_warm_only_where_it_pays_at_the_tail():
    """Absorbing an idle head's shadow costs a head pass: worth it only for a drafter predicted to beat
    plain decoding (within the exploration margin) at batch 1, where every rollout ends."""
    ctl = controller(drafters={"eagle": "target"})
    feed(ctl, 1, 40, accepted=4)  # every draft accepted: drafting pays
    assert ctl.keeps_warm("eagle")
    ctl = controller(drafters={"eagle": "target"}, explore=False)
    feed(ctl, 1, 40, accepted=0, draft_step_s=0.02)  # rarely right, and each draft costs two AR steps
    assert not ctl.keeps_warm("eagle")
    assert not ctl.keeps_warm("unknown") and not StaticController(Arm("eagle", 2)).keeps_warm("eagle")


def test_a_drafter_synced_while_idle_costs_nothing_to_switch_on_and_teaches_no_catch_up():
    ctl = controller(drafters={"eagle": "target"})
    ctl.prefill_pending("eagle")
    for _ in range(30):
        ctl.record(OFF, 8, 0.02, 0.0, None, 8)
    assert ctl.switch_time(Arm("eagle", 2), 8) > 0
    ctl.drafter_synced("eagle")
    assert ctl.switch_time(Arm("eagle", 2), 8) == 0
    assert "eagle" not in ctl._prefill_pending  # the absorb ran the deferred prefill
    ctl.drafter_synced("unknown")  # not one of its drafters: ignored


def test_an_untimed_step_teaches_acceptance_but_no_cost():
    """A step whose time includes a CUDA graph's capture (``timed=False``) must not move the costs."""
    ctl = controller(drafters={"eagle": "target"})
    arm = Arm("eagle", 2)
    before = ctl.predicted_time(arm, 8), ctl.predicted_time(OFF, 8), ctl.expected_emitted(arm)
    ctl.record(arm, 8, 5.0, 1.0, np.full(8, 2), 24, 0.0, False)
    ctl.record(OFF, 8, 5.0, 0.0, None, 8, 0.0, False)
    assert (ctl.predicted_time(arm, 8), ctl.predicted_time(OFF, 8)) == before[:2]
    assert ctl.expected_emitted(arm) > before[2] and len(ctl.trace) == 2
    ctl.record(OFF, 8, 5.0, 0.0, None, 8)
    assert ctl.predicted_time(OFF, 8) > before[1]  # a timed one does


def test_prediction_error_is_small_after_warm_up():
    ctl = controller()
    feed(ctl, 4, 60, accepted=2)
    assert summarize_trace(ctl.trace, warmup=10).median_relative_error < 0.05


def test_trace_records_every_step():
    ctl = controller()
    feed(ctl, 4, 5, accepted=2)
    assert len(ctl.trace) == 5 and all(isinstance(r, StepRecord) and r.batch == 4 for r in ctl.trace)


@pytest.mark.parametrize("cls, kwargs, message", [
    (ControllerConfig, {"max_draft_tokens": 0}, "^max_draft_tokens"),
    (ControllerConfig, {"max_draft_tokens": -2}, "^max_draft_tokens"),
    (ControllerConfig, {"k_choices": ()}, "^k_choices"),
    (ControllerConfig, {"k_choices": (0, 2)}, "^k_choices"),
    (ControllerConfig, {"explore": "greedy"}, "^explore"),
    (ControllerConfig, {"acceptance_memory": 0.0}, "^acceptance_memory"),
    (ControllerTuning, {"cost_spread": -0.1}, "^cost_spread"),
    (ControllerTuning, {"thompson_sharpness": 0.0}, "^thompson_sharpness"),
    (ControllerTuning, {"prior_weight": 0.0}, "^prior_weight"),
    (ControllerTuning, {"prior_acceptance": 1.0}, "^prior_acceptance"),
    (ControllerTuning, {"switch_horizon": 0}, "^switch_horizon"),
])
def test_bad_settings_fail_at_once(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_empty_set_of_arms_fails():
    with pytest.raises(ValueError, match="arms"):
        AdaptiveController(ControllerConfig(allow_off=False), {}, linear_cost())


# ------------------------------------------------------------------------------- in the engine (greedy)

class CyclingController:
    """Walks a fixed schedule of arms, so every switch (off -> on, drafter -> drafter) is exercised."""

    times_drafter = False

    def __init__(self, schedule: list[Arm], warm: bool = False) -> None:
        self.schedule, self.step, self.trace, self.warm = schedule, 0, [], warm
        self.max_k = max(arm.k for arm in schedule)
        self.synced: list[str] = []

    def choose(self, batch: int) -> Arm:
        self.step += 1
        return self.schedule[(self.step - 1) % len(self.schedule)]

    def record(self, *args) -> None:
        pass

    def drafter_lag(self, *args) -> None:
        pass

    def prefill_pending(self, name: str) -> None:
        pass

    def drafters_synced(self) -> None:
        pass

    def drafter_synced(self, name: str) -> None:
        self.synced.append(name)

    def keeps_warm(self, name: str) -> bool:
        return self.warm


SCHEDULE = [OFF, OFF, Arm("eagle", 2), Arm("ngram", 3), OFF, Arm("self:1", 4), Arm("self:1", 1), Arm("eagle", 4),
            Arm("eagle", 1), OFF, OFF, OFF, Arm("self:1", 2), Arm("ngram", 1)]


def prompts(count: int, vocab: int) -> list[list[int]]:
    return ragged_prompts(count, vocab, seed=count)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_switching_arms_every_step_keeps_greedy_output(target, batch):
    model, tokenizer = target
    ar = LLM(model, tokenizer=tokenizer)
    llm = LLM(model, tokenizer=tokenizer, drafter=[EagleDrafter(random_head(model), model), "ngram", "self:1"],
              speculative=ControllerConfig(max_draft_tokens=4, profile_cache=""), max_num_seqs=8)
    llm.engine.controller = CyclingController(SCHEDULE)
    batch_prompts = prompts(batch, model.config.vocab_size)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    want = ar.generate(batch_prompts, params, progress=False)
    got = llm.generate(batch_prompts, params, progress=False)
    for a, b in zip(want, got):
        assert b.samples[0].token_ids == a.samples[0].token_ids
        assert np.allclose(b.samples[0].logprobs, a.samples[0].logprobs, atol=1e-4)
    assert set(llm.stats.arm_steps) >= {"off", "eagle:2", "ngram:3", "self:1:4"}


def test_catch_up_keeps_drafters_exact(target):
    """The target as its own draft model accepts every draft, and keeps doing so after sitting out steps:
    its catch-up pass restored its cache."""
    model, tokenizer = target
    llm = LLM(model, tokenizer=tokenizer, drafter=DraftModelDrafter(model),
              speculative=ControllerConfig(max_draft_tokens=3, profile_cache=""))
    llm.engine.controller = CyclingController([OFF, Arm("draft", 3), OFF, OFF, Arm("draft", 2)])
    llm.generate(prompts(6, model.config.vocab_size), SamplingParams(temperature=0, max_new_tokens=40,
                                                                     ignore_eos=True), progress=False)
    assert llm.stats.spec.accept_rate >= 0.99



def eagle_drafts(model, tokenizer, head, schedule, shadow_limit: int, warm: bool = False) -> tuple[dict, list[int]]:
    """Every draft the head proposed, keyed by (prompt, tokens generated so far), and the positions per
    row each catch-up had to re-read from the target; ``warm``: the controller keeps the idle head in
    sync (the engine absorbs full shadow blocks while it sits out)."""
    llm = LLM(model, tokenizer=tokenizer, drafter=[EagleDrafter(head, model, shadow_limit=shadow_limit), "ngram"],
              speculative=ControllerConfig(max_draft_tokens=2, profile_cache=""))
    seen = {}
    original = llm.engine.drafters["eagle"].propose

    def spy(state, k, sampler):
        proposal = original(state, k, sampler)
        for r in range(state.last_token.shape[0]):
            seen[(tuple(state.sequences[r].prompt_ids), int(state.host_generated[r]))] = proposal.tokens[r].tolist()
        return proposal

    drafter = llm.engine.drafters["eagle"]
    reread, catch_up = [], drafter.catch_up

    def catch_up_spy(state, target, cache):
        reread.append(drafter.lag(state.host_lengths))
        catch_up(state, target, cache)

    drafter.propose, drafter.catch_up = spy, catch_up_spy
    llm.engine.controller = CyclingController(schedule, warm)
    llm.generate(prompts(4, model.config.vocab_size), SamplingParams(temperature=0, max_new_tokens=30,
                                                                     ignore_eos=True), progress=False)
    assert set(llm.engine.controller.synced) <= {"eagle"}
    assert (llm.stats.absorb_s > 0) == bool(llm.engine.controller.synced)
    return seen, reread


@pytest.mark.parametrize("shadow_limit", [0, 3, 64])
def test_eagle_drafts_after_sitting_out_equal_those_of_a_head_that_never_did(target, shadow_limit):
    """After off and n-gram steps the head's drafts equal those of a head that ran every step, whether
    it re-read the missed features from the target (limit 0), kept them while idle (64) or both (3)."""
    model, tokenizer = target
    head = random_head(model, seed=3)
    always, _ = eagle_drafts(model, tokenizer, head, [Arm("eagle", 2)], shadow_limit)
    gaps, reread = eagle_drafts(model, tokenizer, head, [OFF, Arm("eagle", 2), OFF, Arm("ngram", 2), OFF, OFF],
                                shadow_limit)
    assert reread and (max(reread) == 0) == (shadow_limit == 64)  # kept up all along: no target pass
    shared = set(always) & set(gaps)
    assert len(shared) >= 8
    for key in shared:
        assert gaps[key] == always[key], key


@pytest.mark.parametrize("shadow_limit", [3, 5])
def test_an_idle_head_that_absorbs_full_blocks_never_lags_and_drafts_the_same(target, shadow_limit):
    """Kept warm, the head runs each full shadow block while it still sits out: no catch-up ever re-reads
    the target, and its drafts still equal those of a head that ran every step."""
    model, tokenizer = target
    head = random_head(model, seed=3)
    schedule = [OFF, Arm("eagle", 2), OFF, Arm("ngram", 2), OFF, OFF, OFF, OFF, OFF, OFF, OFF]
    always, _ = eagle_drafts(model, tokenizer, head, [Arm("eagle", 2)], shadow_limit)
    cold, cold_reread = eagle_drafts(model, tokenizer, head, schedule, shadow_limit)
    warm, warm_reread = eagle_drafts(model, tokenizer, head, schedule, shadow_limit, warm=True)
    assert max(cold_reread) > 0 and warm_reread and max(warm_reread) == 0
    shared = set(always) & set(warm)
    assert len(shared) >= 8
    for key in shared:
        assert warm[key] == always[key], key


def test_adaptive_llm_runs_and_reports_a_trace(target, tmp_path):
    model, tokenizer = target
    llm = LLM(model, tokenizer=tokenizer, drafter=["ngram", "self:1"],
              speculative=ControllerConfig(max_draft_tokens=3, profile_cache=str(tmp_path)))
    ar = LLM(model, tokenizer=tokenizer)
    batch_prompts = prompts(6, model.config.vocab_size)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    got = llm.generate(batch_prompts, params, progress=False)
    want = ar.generate(batch_prompts, params, progress=False)
    assert [o.samples[0].token_ids for o in got] == [o.samples[0].token_ids for o in want]
    assert len(llm.stats.trace) == llm.stats.decode_steps > 0
    assert sum(llm.stats.arm_steps.values()) == llm.stats.decode_steps


def test_unknown_drafter_and_bad_speculative_fail(target):
    model, tokenizer = target
    with pytest.raises(ValueError, match="drafter"):
        LLM(model, tokenizer=tokenizer, drafter=["ngram", "no-such-drafter"], speculative="adaptive")
    with pytest.raises(ValueError, match="speculative"):
        LLM(model, tokenizer=tokenizer, drafter="ngram", speculative="fastest")
    with pytest.raises(ValueError, match="exactly one drafter"):
        LLM(model, tokenizer=tokenizer, drafter=["ngram", "self:1"], speculative=3)


def test_one_speculative_api_in_all_its_spellings(target):
    """None / "off", an int k, "adaptive" or a ControllerConfig: each builds its controller, and each
    combination that makes no sense is refused naming ``speculative``."""
    model, tokenizer = target
    cases = [(None, None), ("off", None), (3, StaticController), ("adaptive", AdaptiveController),
             (ControllerConfig(max_draft_tokens=2, profile_cache=""), AdaptiveController)]
    for speculative, kind in cases:
        drafter = None if speculative in (None, "off") else "ngram"
        engine = LLM(model, tokenizer=tokenizer, drafter=drafter, speculative=speculative).engine
        assert (engine.controller is None) if kind is None else isinstance(engine.controller, kind)
    one = LLM(model, tokenizer=tokenizer, drafter="ngram").engine.controller  # a drafter alone: k = DEFAULT_K
    assert isinstance(one, StaticController) and one.arm == Arm("ngram", DEFAULT_K)
    for drafter, speculative, message in ((["ngram", "self:1"], None, "need speculative='adaptive'"),
                                          ("ngram", "off", "'off' with drafters"),
                                          (None, "adaptive", "needs a drafter"), (None, 2, "exactly one drafter")):
        with pytest.raises(ValueError, match=f"^speculative: .*{message}"):
            LLM(model, tokenizer=tokenizer, drafter=drafter, speculative=speculative)


def test_profile_noise_is_removed_by_the_dominated_minimum():
    from respec.engine.profile import dominated_minimum

    table = np.array([[1.0, 1.5, 9.0, 2.5],   # 9.0: an interrupted measurement
                      [5.0, 2.0, 2.5, 3.0]])  # 5.0 at batch 2 x 1 token > batch 2 x 2 tokens
    assert dominated_minimum(table).tolist() == [[1.0, 1.5, 2.5, 2.5], [2.0, 2.0, 2.5, 3.0]]


def test_drafter_cost_is_learned_on_catch_up_steps_too():
    """Alternating off and on makes every drafting step a catch-up step; the proposal's own time must
    still be learned (else the drafter would look free), and the catch-up model gets its own scale."""
    ctl = controller(drafters={"eagle": "target"})
    for _ in range(20):
        ctl.record(OFF, 4, 0.02, 0.0, None, 4)
        ctl.record(Arm("eagle", 2), 4, 0.05, 0.004, np.array([1, 1, 1, 1]), 8, catch_up_seconds=0.02)
    assert ctl.cost.draft_time("eagle", 4, 2) == pytest.approx(0.004, rel=1e-3)
    ctl.missed["eagle"] = ctl.reread["eagle"] = 1.0
    assert ctl.switch_time(Arm("eagle", 2), 4) == pytest.approx(0.02, rel=1e-2)


def test_an_engine_that_never_drafts_with_the_head_never_runs_it(target):
    """The head's prefill is deferred to its first catch-up: held at off (or on the n-gram drafter),
    the engine pays nothing for a head it does not use, prompt included."""
    model, tokenizer = target
    llm = LLM(model, tokenizer=tokenizer, drafter=[EagleDrafter(random_head(model), model), "ngram"],
              speculative=ControllerConfig(max_draft_tokens=2, profile_cache=""))
    drafter = llm.engine.drafters["eagle"]
    runs, run = [], drafter._run
    drafter._run = lambda *args, **kwargs: runs.append(1) or run(*args, **kwargs)
    llm.engine.controller = CyclingController([OFF, Arm("ngram", 2)])
    llm.generate(prompts(4, model.config.vocab_size), SamplingParams(temperature=0, max_new_tokens=12,
                                                                     ignore_eos=True), progress=False)
    assert runs == []
    llm.engine.controller = CyclingController([OFF, Arm("eagle", 2)])
    llm.generate(prompts(4, model.config.vocab_size), SamplingParams(temperature=0, max_new_tokens=12,
                                                                     ignore_eos=True), progress=False)
    assert runs


def test_a_negative_shadow_limit_fails_at_once(target):
    model, _ = target
    with pytest.raises(ValueError, match="shadow_limit"):
        EagleDrafter(random_head(model), model, shadow_limit=-1)
