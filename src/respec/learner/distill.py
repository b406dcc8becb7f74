"""Distillation of the EAGLE head from the target, with a training-time-test (TTT) unroll.

Training data are whole sequences ``x_0 .. x_{T-1}`` with the target's fused features ``F_t`` and its
logits at every position. Entry ``t`` of the head consumes ``(F_t, x_{t+1})`` and is trained towards
the target's distribution ``p_{t+1}`` (of ``x_{t+2}``). At inference the head drafts ``j`` steps past
its last target feature on its own hidden states, so depth ``j`` of the unroll feeds entry ``t`` the
head's depth ``j-1`` output at ``t-1`` and lets it attend, as its cache would, to depth-0 entries up
to ``t-j`` and to one entry of each depth ``1..j`` (positions ``t-j+1 .. t``). All depths train at
once; the loss is a divergence between p and q (forward KL(p || q) by default, see losses.py),
optionally weighted per sequence (the online learner's reward weights).

Targets come dense (logits over the head's output vocabulary) or as the top-K logprobs at the
distillation temperature plus the rest's mass; the divergence is then taken over the K + 1 bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.decoder import DecoderLM
from ..models.eagle import EagleHead
from .losses import divergence


@dataclass
class DistillBatch:
    features: torch.Tensor  # [B, T, 3D] target's fused-layer outputs
    tokens: torch.Tensor  # [B, T]
    target_logits: torch.Tensor  # [B, T, V'] target logits over the head's output vocabulary, or [B, T, K]
    # top-K logprobs (at the distillation temperature) when ``target_index`` is given
    prompt_lens: torch.Tensor  # [B]: entries from prompt_len - 1 on are trained (they draft the response)
    lengths: torch.Tensor  # [B] real tokens per row (rows are right-padded)
    weights: torch.Tensor | None = None  # [B] per-sequence loss weights (default 1)
    target_index: torch.Tensor | None = None  # [B, T, K] int64 head-vocabulary ids of the top-K targets


@dataclass
class DistillResult:
    loss: torch.Tensor
    kl: list[float]  # per depth: mean KL(p || q) over trained entries
    top1: list[float]  # per depth: argmax q == argmax p
    alpha: list[float]  # per depth: mean sum_x min(p, q), the acceptance probability of one draft

    @property
    def tau_sim(self) -> float:
        """Simulated acceptance length with k = number of depths: 1 + sum_j prod_{i<=j} alpha_i."""
        total, chain = 1.0, 1.0
        for alpha in self.alpha:
            chain *= alpha
            total += chain
        return total


def ttt_unroll(head: EagleHead, target: DecoderLM, features: torch.Tensor, tokens: torch.Tensor,
               depths: int) -> list[torch.Tensor]:
    """The head's outputs ``[B, T-1, D]`` at each depth ``0 .. depths-1`` of the TTT unroll.

    Output ``t`` of depth ``j`` is what the engine's ``j``-th draft step computes when ``F_{t-j}`` is
    the newest target feature and ``x_{t-j+1} .. x_{t+1}`` are the tokens after it (drafted ones for
    ``j > 0``): training and inference see the same inputs (tests/test_eagle.py checks it).
    """
    rows, steps = tokens.shape
    entries = steps - 1  # entry t pairs F_t with x_{t+1}
    cos, sin = target._rope(torch.arange(entries, device=tokens.device).expand(rows, entries))
    embeds = target.embed(tokens[:, 1:])
    hidden = head.fuse(features[:, :-1])
    keys, values, outputs = [], [], []
    for depth in range(depths):
        if depth > 0:  # the head's own previous output, one position back
            hidden = F.pad(outputs[-1][:, :-1], (0, 0, 1, 0))
        q, k, v = head.project(embeds, hidden, cos, sin)
        keys.append(k)
        values.append(v)
        mask = _depth_mask(entries, depth, tokens.device)
        outputs.append(head.attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask, hidden))
    return outputs


def ttt_forward(head: EagleHead, target: DecoderLM, batch: DistillBatch, depths: int,
                temperature: float = 1.0, loss: str = "forward_kl") -> DistillResult:
    """Loss and per-depth statistics of the head unrolled ``depths`` steps on ``batch``."""
    entries = batch.tokens.shape[1] - 1
    positions = torch.arange(entries, device=batch.tokens.device)
    # Dense targets: raw logits, turned into logprobs at ``temperature`` only on the trained entries.
    target_dist = (batch.target_logits[:, 1:], None if batch.target_index is None else batch.target_index[:, 1:])
    base_mask = _trained_entries(batch, entries)
    losses, stats = [], {"kl": [], "top1": [], "alpha": []}
    for depth, out in enumerate(ttt_unroll(head, target, batch.features, batch.tokens, depths)):
        trained = base_mask & (positions[None, :] - depth >= batch.prompt_lens[:, None] - 1)
        depth_loss, depth_stats = _depth_loss(head, target, out, target_dist, trained, batch.weights,
                                              temperature, loss)
        losses.append(depth_loss)
        for name, value in depth_stats.items():
            stats[name].append(value)
    return DistillResult(loss=torch.stack(losses).mean(), **stats)


def _trained_entries(batch: DistillBatch, entries: int) -> torch.Tensor:
    t = torch.arange(entries, device=batch.tokens.device)[None, :]
    # p_{t+1} must come from a real position: t + 1 <= length - 1.
    return (t >= batch.prompt_lens[:, None] - 1) & (t + 1 <= batch.lengths[:, None] - 1)


def _depth_mask(entries: int, depth: int, device: torch.device) -> torch.Tensor:
    """bool ``[T, (depth+1) T]``: depth-0 keys at s <= t - depth, depth-i keys only at s == t - depth + i."""
    t = torch.arange(entries, device=device)[:, None]
    s = torch.arange(entries, device=device)[None, :]
    blocks = [s <= t - depth] + [s == t - depth + i for i in range(1, depth + 1)]
    # Every row sees at least itself (depth 0: s == t; depth j: its own block), so softmax never
    # meets an all-masked row; entries with t < depth have no real context and are not trained.
    return torch.cat(blocks, dim=1)


def _depth_loss(head: EagleHead, target: DecoderLM, hidden: torch.Tensor, target_dist: tuple,
                trained: torch.Tensor, weights: torch.Tensor | None, temperature: float, kind: str):
    """The divergence of the head from p on the trained entries only (saves the LM-head cost)."""
    rows, cols = trained.nonzero(as_tuple=True)
    if rows.numel() == 0:
        zero = hidden.sum() * 0.0
        return zero, {"kl": 0.0, "top1": 0.0, "alpha": 0.0}
    logits = head.head_logits(hidden[rows, cols], target) / temperature
    q_logp = F.log_softmax(logits, dim=-1)
    target_values, target_index = target_dist
    p_logp = target_values[rows, cols].float()
    if target_index is None:
        p_logp = F.log_softmax(p_logp / temperature, dim=-1)
    top1 = q_logp.argmax(-1) == (p_logp.argmax(-1) if target_index is None else target_index[rows, cols, 0])
    if target_index is not None:
        p_logp, q_logp = _top_k_bins(p_logp, q_logp, target_index[rows, cols])
    per_row = divergence(p_logp, q_logp, kind)
    row_weight = weights[rows] if weights is not None else torch.ones_like(per_row)
    loss = (per_row * row_weight).sum() / row_weight.sum().clamp(min=1e-8)
    with torch.no_grad():
        kl = per_row if kind == "forward_kl" else divergence(p_logp, q_logp, "forward_kl")
        stats = {"kl": float(kl.mean()), "top1": float(top1.float().mean()),
                 "alpha": float(torch.minimum(p_logp.exp(), q_logp.exp()).sum(-1).mean())}
    return loss, stats


def _top_k_bins(p_top: torch.Tensor, q_logp: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p and q over K + 1 bins: the top-K tokens of p, then everything else."""
    q_top = q_logp.gather(-1, index)

    def with_rest(top: torch.Tensor) -> torch.Tensor:
        mass = top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
        return torch.cat((top, torch.log1p(-mass)), dim=-1)

    return with_rest(p_top), with_rest(q_top)
