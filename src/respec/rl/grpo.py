"""GRPO maths as pure functions: group advantages and the clipped policy loss.

Shapes: ``rewards [N]`` with the ``G`` samples of a prompt contiguous (N = prompts x G);
token tensors ``[N, T]`` over response positions with ``mask`` marking real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's standard deviation (``scale="std"``, as
    in DeepSeekMath) or not (``"none"``: the mean-only variant of Dr. GRPO). A group of equal rewards
    gets zero advantage, never NaN."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: {tuple(rewards.shape)} is not a whole number of groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale: must be 'std' or 'none', got {scale!r}")
    return centred.view(-1).to(rewards.dtype)


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar to back-propagate
    clip_ratio: torch.Tensor  # share of tokens whose ratio was clipped (no gradient)
    kl: torch.Tensor  # mean k3 estimate of KL(policy || reference) (0 without a reference)
    ratio_mean: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                num_tokens: float | None = None) -> LossParts:
    """PPO-clip on the ratio against the rollout's logprobs, token-level aggregation.

    ``num_tokens``: the response tokens of the whole batch when this is one micro-batch of it; the
    sum over micro-batches of their losses is then the token mean over the batch (as in DAPO).
    """
    mask = mask.to(logprobs.dtype)
    total = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    total = total.clamp(min=1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(logprobs.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        # k3 = exp(ref - pi) - (ref - pi) - 1 >= 0, unbiased for KL(pi || ref) (Schulman's estimator).
        delta = ref_logprobs - logprobs
        k3 = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * k3
        kl = (k3 * mask).sum().detach() / total
    loss = (per_token * mask).sum() / total
    with torch.no_grad():
        was_clipped = (clipped < unclipped).to(logprobs.dtype)  # the clipped branch was the minimum
        clip_ratio = (was_clipped * mask).sum() / total
        ratio_mean = (ratio * mask).sum() / total
    return LossParts(loss, clip_ratio, kl, ratio_mean)


def response_logprobs(logprobs_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logprobs_all [N, T, V]`` at the chosen ``tokens [N, T]``."""
    return logprobs_all.gather(-1, tokens[..., None]).squeeze(-1)
