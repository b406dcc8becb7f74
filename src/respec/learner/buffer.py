"""The online learner's sample buffer, filled from the actor's training forward at no extra cost.

GRPO's update already runs the actor over prompt + response. Its outputs of the drafter's fusion
layers and its logits at the response positions are exactly what distillation needs, so
``capture_micro_batch`` keeps a detached copy of them (features in bf16, logits restricted to the
drafter's output vocabulary, either whole or as the top-K logprobs plus the rest's mass) together
with the sample's reward and advantage. The buffer is bounded in tokens; the oldest samples go first.

Positions: a sample of ``L`` tokens with a prompt of ``n`` has features at ``0 .. L-1`` and target
distributions at ``n .. L-2`` (the training forward predicts response token ``j`` at position
``n - 1 + j``; distillation entry ``t`` learns ``p`` at ``t + 1``), so entries ``n-1 .. L-3`` train.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distill import DistillBatch


@dataclass
class Sample:
    tokens: torch.Tensor  # [L] int64, prompt + response
    prompt_len: int
    features: torch.Tensor  # [L, 3D] bf16 fused-layer outputs
    target: torch.Tensor  # [L - n - 1, V'] bf16 log-softmax of the logits, or [L - n - 1, K] f32 logprobs (top-K)
    target_index: torch.Tensor | None  # [L - n - 1, K] int32 draft-vocabulary ids of the top-K; None = dense
    reward: float
    advantage: float
    step: int  # the RL step whose rollout produced it

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


class SampleBuffer:
    """A FIFO of samples bounded by their total token count; safe to fill and read from two threads."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._samples: deque[Sample] = deque()
        self._tokens = 0
        self._lock = threading.Lock()
        self.added = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def add(self, samples: list[Sample]) -> None:
        with self._lock:
            for sample in samples:
                self._samples.append(sample)
                self._tokens += sample.num_tokens
                self.added += 1
            while self._tokens > self.max_tokens and len(self._samples) > 1:
                self._tokens -= self._samples.popleft().num_tokens
                self.evicted += 1

    def snapshot(self) -> list[Sample]:
        """The samples now held (a list the caller may keep while others are added)."""
        with self._lock:
            return list(self._samples)

    def state(self) -> dict:
        with self._lock:
            return {"samples": list(self._samples), "added": self.added, "evicted": self.evicted}

    def load_state(self, state: dict) -> None:
        with self._lock:
            self._samples = deque(state["samples"])
            self._tokens = sum(s.num_tokens for s in self._samples)
            self.added, self.evicted = state["added"], state["evicted"]


def capture_micro_batch(ids: torch.Tensor, lengths: list[int], prompt_lens: list[int],
                        captured: dict[int, torch.Tensor], logits: torch.Tensor, fuse_layers: tuple[int, ...],
                        draft_vocab: torch.Tensor | None, rewards: list[float], advantages: list[float],
                        step: int, temperature: float, top_k: int = 0) -> list[Sample]:
    """Samples from one micro-batch of the actor's training forward.

    ``captured[layer]`` is ``[M, W, D]``; ``logits [M, T, V]`` are the actor's logits at the positions
    predicting response tokens ``0 .. T-1``. Everything is detached and moved to the host."""
    with torch.no_grad():
        features = torch.cat([captured[layer] for layer in fuse_layers], dim=-1).detach()
        logits = logits.detach()
        if draft_vocab is not None and draft_vocab.numel():
            logits = logits.index_select(-1, draft_vocab.to(logits.device))
        samples = []
        for row, (length, prompt_len) in enumerate(zip(lengths, prompt_lens)):
            steps = length - prompt_len
            if steps < 2:  # no trainable entry (needs p at a position past the first response token)
                continue
            row_logits = logits[row, 1:steps]  # positions n .. L-2
            target, index = _target(row_logits, temperature, top_k)
            samples.append(Sample(tokens=ids[row, :length].cpu(), prompt_len=prompt_len,
                                  features=features[row, :length].to(torch.bfloat16).cpu(), target=target,
                                  target_index=index, reward=rewards[row], advantage=advantages[row], step=step))
    return samples


def _target(logits: torch.Tensor, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not top_k or top_k >= logits.shape[-1]:
        # log_softmax first: bf16 then holds the likely tokens' values (near 0) finely, and dividing
        # by a temperature later gives the same distribution as raw logits would (a shift is harmless).
        return F.log_softmax(logits.float(), dim=-1).to(torch.bfloat16).cpu(), None
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, index = logp.topk(top_k, dim=-1)
    return values.cpu(), index.to(torch.int32).cpu()


def collate(samples: list[Sample], weights: torch.Tensor | None, device: torch.device,
            dtype: torch.dtype) -> DistillBatch:
    """Right-padded DistillBatch; target rows sit at their positions ``n .. L-2``."""
    rows, width = len(samples), max(s.num_tokens for s in samples)
    dense = samples[0].target_index is None
    tokens = torch.zeros(rows, width, dtype=torch.int64)
    features = torch.zeros(rows, width, samples[0].features.shape[-1], dtype=dtype)
    # dense targets stay bf16 until the trained rows are picked (distill converts those to fp32)
    target = torch.zeros(rows, width, samples[0].target.shape[-1], dtype=samples[0].target.dtype)
    index = None if dense else torch.zeros(rows, width, samples[0].target.shape[-1], dtype=torch.int64)
    if not dense:
        target.fill_(float("-inf"))
        target[..., 0] = 0.0  # padding rows: one certain bin, never trained
    for row, sample in enumerate(samples):
        n, length = sample.prompt_len, sample.num_tokens
        tokens[row, :length] = sample.tokens
        features[row, :length] = sample.features.to(dtype)
        target[row, n: length - 1] = sample.target.to(target.dtype)
        if index is not None:
            index[row, n: length - 1] = sample.target_index.long()
    return DistillBatch(features=features.to(device), tokens=tokens.to(device), target_logits=target.to(device),
                        prompt_lens=torch.tensor([s.prompt_len for s in samples], device=device),
                        # entry t trains on p at t + 1 <= L - 2: as if the sequence ended one earlier
                        lengths=torch.tensor([s.num_tokens - 1 for s in samples], device=device),
                        weights=None if weights is None else weights.to(device),
                        target_index=None if index is None else index.to(device))
