"""Divergences and reward weights of the online learner (pure functions)."""

from __future__ import annotations

import pytest
import torch

from respec.learner.losses import divergence, reward_weights


def random_logp(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.log_softmax(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.float64) * 2, dim=-1)


def test_forward_and_reverse_kl_match_their_definitions():
    p, q = random_logp(5, 11, 0), random_logp(5, 11, 1)
    forward = (p.exp() * (p - q)).sum(-1)
    reverse = (q.exp() * (q - p)).sum(-1)
    torch.testing.assert_close(divergence(p, q, "forward_kl"), forward)
    torch.testing.assert_close(divergence(p, q, "reverse_kl"), reverse)


def test_jsd_and_tv_are_symmetric_and_bounded():
    p, q = random_logp(5, 11, 2), random_logp(5, 11, 3)
    for kind, bound in (("jsd", torch.log(torch.tensor(2.0))), ("tv", 1.0)):
        a, b = divergence(p, q, kind), divergence(q, p, kind)
        torch.testing.assert_close(a, b)
        assert (a >= 0).all() and (a <= bound + 1e-9).all()
    acceptance = torch.minimum(p.exp(), q.exp()).sum(-1)
    torch.testing.assert_close(divergence(p, q, "tv"), 1 - acceptance)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_divergences_vanish_at_equality_and_handle_disjoint_support(kind):
    p = random_logp(3, 7, 4)
    assert divergence(p, p, kind).abs().max() < 1e-12
    masked = p.clone()
    masked[:, :3] = float("-inf")  # q puts no mass where p has some
    masked = torch.log_softmax(masked, dim=-1)
    value = divergence(masked, masked, kind)
    assert torch.isfinite(value).all() and value.abs().max() < 1e-12


def test_reward_weights():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5])
    advantages = torch.tensor([-1.0, 0.5, 0.5, 0.0])
    assert reward_weights(rewards, advantages, "none").tolist() == [1.0] * 4
    assert reward_weights(rewards, advantages, "reward").tolist() == rewards.tolist()
    assert reward_weights(rewards, advantages, "positive_advantage").tolist() == [0.0, 1.0, 1.0, 0.0]
    normalized = reward_weights(torch.tensor([-3.0, 0.0, 100.0]), advantages[:3], "normalized", clip=2.0)
    assert normalized.min() == 0 and normalized.max() <= 2.0
    with pytest.raises(ValueError, match="learner.weighting"):
        reward_weights(torch.tensor([-1.0]), torch.zeros(1), "reward")
    with pytest.raises(ValueError, match="learner.weighting"):
        reward_weights(rewards, advantages, "squared")
    with pytest.raises(ValueError, match="learner.loss"):
        divergence(random_logp(1, 3, 0), random_logp(1, 3, 1), "hellinger")
