"""Distillation divergences and reward weights for the online learner, as pure functions.

Divergences take the target's log-probabilities ``p_logp`` and the drafter's ``q_logp`` (``[N, V]``,
``-inf`` allowed outside a support) and return one value per row. Forward KL(p || q) is ReSpec's
choice: it makes the drafter cover the target's mass, which is what the acceptance test rewards
(acceptance of one draft = sum_x min(p, q) = 1 - TV(p, q), so TV is offered as the direct objective).
"""

from __future__ import annotations

import torch

from .config import DIVERGENCES, REWARD_WEIGHTS


def _plogq(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * log q with 0 * log 0 = 0 (and 0 * -inf = 0)."""
    return torch.where(p > 0, p * logq, torch.zeros_like(p))


def divergence(p_logp: torch.Tensor, q_logp: torch.Tensor, kind: str = "forward_kl") -> torch.Tensor:
    """Per-row divergence between p (target) and q (drafter)."""
    p, q = p_logp.exp(), q_logp.exp()
    if kind == "forward_kl":  # sum p (log p - log q): as cross-entropy minus p's entropy
        return (_plogq(p, p_logp) - _plogq(p, q_logp)).sum(-1)
    if kind == "reverse_kl":
        return (_plogq(q, q_logp) - _plogq(q, p_logp)).sum(-1)
    if kind == "jsd":
        m_logp = torch.logaddexp(p_logp, q_logp) - torch.log(torch.tensor(2.0, dtype=p_logp.dtype))
        return 0.5 * ((_plogq(p, p_logp) - _plogq(p, m_logp)).sum(-1) + (_plogq(q, q_logp) - _plogq(q, m_logp)).sum(-1))
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"learner.loss: must be one of {DIVERGENCES}, got {kind!r}")


def reward_weights(rewards: torch.Tensor, advantages: torch.Tensor, kind: str = "reward",
                   clip: float = 5.0, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample weights of the distillation loss.

    ``none``: 1. ``reward``: r (the paper's default; samples with reward 0 teach nothing).
    ``normalized``: (r - mean) / std, shifted to be >= 0 and clipped at ``clip``.
    ``positive_advantage``: 1 where the advantage is > 0, else 0.
    """
    if kind == "none":
        return torch.ones_like(rewards)
    if kind == "reward":
        if (rewards < 0).any():
            raise ValueError("learner.weighting: 'reward' needs rewards >= 0; use 'normalized' for signed rewards")
        return rewards.clone()
    if kind == "normalized":
        z = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
        return (z - z.min()).clamp(max=clip)
    if kind == "positive_advantage":
        return (advantages > 0).to(rewards.dtype)
    raise ValueError(f"learner.weighting: must be one of {REWARD_WEIGHTS}, got {kind!r}")
