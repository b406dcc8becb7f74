"""GRPO maths (section D, 22), rewards, tasks and configuration errors (26), without a model."""

from __future__ import annotations

import json

import pytest
import torch

from respec.config import load_config
from respec.rl.grpo import group_advantages, policy_loss
from respec.rl.rewards import combine, correctness_reward, format_reward
from respec.rl.tasks import arithmetic_problems, gsm8k_problems, load_task


def reference_advantages(rewards: list[float], group: int, scale: str) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start: start + group]
        mean = sum(chunk) / group
        std = (sum((r - mean) ** 2 for r in chunk) / (group - 1)) ** 0.5
        out += [(r - mean) / (std + 1e-6) if scale == "std" else r - mean for r in chunk]
    return out


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("group", [2, 4, 8])
def test_advantages_match_a_reference_loop(scale, group):
    rewards = torch.rand(8 * group, generator=torch.Generator().manual_seed(group), dtype=torch.float64)
    got = group_advantages(rewards, group, scale)
    want = torch.tensor(reference_advantages(rewards.tolist(), group, scale), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_equal_rewards_give_zero_advantage_without_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(rewards, 4)
    assert torch.isfinite(advantages).all()
    assert advantages[:8].abs().max() == 0 and advantages[8:].abs().min() > 0.5


def test_advantage_shape_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 4, "rank")


def test_policy_loss_clips_and_aggregates_by_token():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.1, 1.0, 1.0]]))
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    parts = policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    # Row 0 (A=+1): min(r, clip(r)) = 1.2, 1.0, 0.5; row 1 (A=-1): min(-r, -clip(r)) = -1.1, -1.0.
    assert float(parts.loss) == pytest.approx(-(1.2 + 1.0 + 0.5 - 1.1 - 1.0) / 5)
    assert float(parts.clip_ratio) == pytest.approx(1 / 5)  # only the 1.5 of row 0 is clipped


def test_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(0)
    new, old = torch.randn(6, 5) * 0.1, torch.randn(6, 5) * 0.1
    advantages, mask = torch.randn(6), torch.rand(6, 5) > 0.3
    full = policy_loss(new, old, advantages, mask).loss
    total = float(mask.sum())
    parts = [policy_loss(new[s: s + 2], old[s: s + 2], advantages[s: s + 2], mask[s: s + 2], num_tokens=total).loss
             for s in range(0, 6, 2)]
    torch.testing.assert_close(sum(parts), full)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    same = policy_loss(lp, lp, torch.zeros(1), mask, ref_logprobs=lp, kl_coef=0.1)
    assert float(same.kl) == 0.0
    other = policy_loss(lp, lp, torch.zeros(1), mask, ref_logprobs=lp - 0.3, kl_coef=0.1)
    assert float(other.kl) > 0 and float(other.loss) == pytest.approx(0.1 * float(other.kl))


# -------------------------------------------------------------------------------------------- rewards

def test_correctness_is_robust_to_number_formatting():
    completions = ["47 + 38 = 85. Answer: 85", "The total is $1,200.", "Answer: 1200.0", "I think 12. Answer: 13",
                   "no idea", "Answer: 0.5"]
    gold = ["85", "1200", "1200", "12", "5", "1/2"]
    assert correctness_reward(completions, gold) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_format_reward_and_weighted_combination():
    completions = ["so 4. Answer: 4", "4"]
    assert format_reward(completions, ["4", "4"]) == [1.0, 0.0]
    assert combine({"correctness": 1.0, "format": 0.5})(completions, ["4", "4"]) == [1.5, 1.0]
    with pytest.raises(ValueError, match="reward.weights"):
        combine({"speed": 1.0})
    with pytest.raises(ValueError, match="gold"):
        correctness_reward(["a"], [])


# ---------------------------------------------------------------------------------------------- tasks

def test_arithmetic_problems_are_seeded_and_correct():
    problems = arithmetic_problems(30, seed=3)
    assert problems == arithmetic_problems(30, seed=3) and problems != arithmetic_problems(30, seed=4)
    assert correctness_reward([f"Answer: {p.answer}" for p in problems], [p.answer for p in problems]) == [1.0] * 30
    train, held_out = load_task("arithmetic", 200, 50, seed=0)
    assert len(held_out) == 50 and not {p.question for p in train} & {p.question for p in held_out}
    with pytest.raises(ValueError, match="levels"):
        arithmetic_problems(3, 0, levels=(7,))


def test_gsm8k_loader_reads_answers_and_names_bad_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "q1", "answer": "steps\n#### 1,200"}) + "\n"
                    + json.dumps({"question": "q2", "answer": "#### 7"}) + "\n")
    assert [p.answer for p in gsm8k_problems(good)] == ["1200", "7"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q1", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        gsm8k_problems(bad)
    with pytest.raises(ValueError, match="does not exist"):
        gsm8k_problems(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------- 26. configs

@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1e-5", "optim.lrr"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.batch_size=10", "rollout.batch_size"),
    ("rollout.temperature=-0.5", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("steps=many", "steps"),
    ("rollout.speculative=sometimes", "rollout.speculative"),
    ("reward.weights={speed: 1}", "reward.weights"),
    ("task.name=chess", "task.name"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: "):
        load_config(None, ["rollout.group_size=4", override])


@pytest.mark.parametrize("overrides, field", [
    (["task.switch_at=3"], "task.switch_at"),
    (["task.switch_to.name=arithmetic"], "task.switch_at"),
    (["task.switch_at=3", "task.switch_to.name=chess"], "task.switch_to.name"),
    (["task.switch_at=3", "task.switch_to.num_eval=0"], "task.switch_to.num_eval"),
    (["task.switch_at=3", "task.switch_to.switch_at=5", "task.switch_to.switch_to.name=arithmetic"],
     "task.switch_to.switch_to"),
])
def test_bad_task_switch_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: "):
        load_config(None, overrides)


def test_task_switch_stages():
    config = load_config(None, ["task.levels=[1]", "task.switch_at=3", "task.switch_to.levels=[3]"])
    stages = [config.task.stage(step).levels for step in (1, 2, 3, 9)]
    assert stages == [[1], [1], [3], [3]]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nrollout:\n  speculative: off\n  temperature: 0.7\noptim:\n  lr: 1e-5\n")
    config = load_config(path, ["rollout.temperature=0.6", "rollout.drafters=[ngram, self:2]"])
    assert (config.steps, config.rollout.speculative, config.rollout.temperature) == (5, "off", 0.6)
    assert config.optim.lr == 1e-5 and config.rollout.drafters == ["ngram", "self:2"]
    assert load_config(None, ["rollout.group_size=4", "rollout.batch_size=32"]).rollout.prompts_per_step == 8
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
