"""GRPO maths as pure functions: group advantages and the clipped policy loss."""

from __future__ import annotations

import pytest
import torch

from respec.rl.grpo import group_advantages, policy_loss


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
