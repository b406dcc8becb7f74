"""Rewards: correctness through math-verify, the format reward, weighted combinations."""

from __future__ import annotations

import pytest

from respec.rl.rewards import combine, correctness_reward, format_reward


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
