"""The online learner: reward-weighted distillation of the actor into its EAGLE drafter, during RL.

The learner owns a private copy of the head (the engine's copy keeps drafting while this one trains),
its optimizer and the sample buffer. A round draws ``updates_per_round`` batches from the buffer, takes
one optimizer step on each (TTT unroll, the configured divergence, per-sample reward weights), and
publishes the whole head with the next version number; the engine's drafter swaps it in between
decode steps. The head reads the actor's embedding and rope tables; a round uses a
``FrozenTarget`` copy of them taken at a safe point (after the actor's optimizer step), so it can run
in a thread while the actor trains and generates.
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.drafters.eagle import EagleDrafter
from ..engine.snapshots import Mailbox, apply_snapshot, make_snapshot
from ..models.decoder import DecoderLM
from ..models.linear import fast_linear
from .buffer import Sample, SampleBuffer, capture_micro_batch, collate
from .config import LearnerConfig
from .distill import DistillResult, ttt_forward
from .losses import reward_weights


class FrozenTarget:
    """The actor parts the head reads (embedding, rope, and the LM head of a full-vocabulary head), copied
    so a background round never reads weights the actor's optimizer is changing (nor sends gradients
    into them)."""

    def __init__(self, actor: DecoderLM, with_head: bool, dtype: torch.dtype = torch.float32) -> None:
        with torch.no_grad():
            self.embed_tokens = actor.embed_tokens.detach().to(dtype, copy=True)
            self.head_weight = None
            if with_head:
                weight = actor.embed_tokens if actor.lm_head is None else actor.lm_head.weight
                self.head_weight = weight.detach().to(dtype, copy=True)
        self.rope_cos, self.rope_sin = actor.rope_cos, actor.rope_sin  # buffers, never trained
        self.dtype, self.device = dtype, actor.device
        self.ready = None  # on a GPU: the copies' completion, for a learner on another stream to wait on
        if self.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return fast_linear(hidden, self.head_weight).float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.rope_cos[positions].to(self.dtype).unsqueeze(2)
        return cos, self.rope_sin[positions].to(self.dtype).unsqueeze(2)


@dataclass
class RoundResult:
    version: int  # published (unchanged when the round was skipped)
    step: int  # the RL step whose samples were the newest in the buffer
    updates: int
    seconds: float
    kd_loss: float = 0.0
    acc_steps: tuple[float, ...] = ()  # top-1 agreement per unroll depth, mean over the round
    tau_sim_before: float | None = None  # simulated acceptance length on the newest samples, before training
    tau_sim_after: float | None = None  # ... and after


class OnlineLearner:
    def __init__(self, drafter: EagleDrafter, config: LearnerConfig, depths: int, temperature: float,
                 seed: int = 0) -> None:
        self.drafter, self.config = drafter, config
        self.depths, self.temperature = depths, temperature
        # An fp32 master copy (AdamW steps on bf16 weights would round small updates away); the
        # published snapshots are cast to the drafter's own dtype.
        self.head = copy.deepcopy(drafter.head).float().train().requires_grad_(True)
        self.publish_dtype = next(drafter.head.parameters()).dtype
        self.head.draft_to_target.requires_grad_(False)
        self.params = [p for p in self.head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.buffer = SampleBuffer(config.buffer_tokens)
        self.mailbox = Mailbox()
        self.version = drafter.version
        self.rng = random.Random(seed)
        self.updates, self.train_time_s = 0, 0.0
        self._warned_negative = False
        # per version: the RL step of the newest samples it learned from (the loaded head: the initial actor)
        self.version_step: dict[int, int] = {self.version: 0}
        # The newest step a round has measured ``tau_sim`` on: a round with no newer samples reports
        # none, since the head has already trained on what it would measure.
        self.evaluated_step = -1
        drafter.subscribe(self.mailbox)

    @property
    def fuse_layers(self) -> tuple[int, ...]:
        return tuple(self.head.config.fuse_layers)

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        return self.head.draft_to_target if self.head.draft_head is not None else None

    def frozen_target(self, actor: DecoderLM) -> FrozenTarget:
        return FrozenTarget(actor, with_head=self.head.draft_head is None, dtype=torch.float32)

    # ------------------------------------------------------------------ samples
    def capture(self, ids: torch.Tensor, lengths: list[int], prompt_lens: list[int], captured: dict,
                logits: torch.Tensor, rewards: list[float], advantages: list[float], step: int) -> None:
        """Keep a micro-batch of the actor's training forward (see buffer.capture_micro_batch)."""
        self.buffer.add(capture_micro_batch(ids, lengths, prompt_lens, captured, logits, self.fuse_layers,
                                            self.draft_vocab, rewards, advantages, step, self.temperature,
                                            self.config.logits_top_k))

    def ready(self) -> bool:
        return self.buffer.num_tokens >= max(self.config.min_buffer_tokens, 1)

    # ------------------------------------------------------------------ training
    def train_round(self, target: FrozenTarget) -> RoundResult:
        """``updates_per_round`` optimizer steps on buffer samples, then publish the next version."""
        started = time.perf_counter()
        samples = self.buffer.snapshot()
        newest = max((s.step for s in samples), default=-1)
        weights = self._weights(samples)
        eligible = [i for i, w in enumerate(weights.tolist()) if w > 0]
        if not eligible:  # nothing to learn from (e.g. every reward 0 under reward weighting)
            return RoundResult(self.version, newest, 0, time.perf_counter() - started)
        unseen = newest > self.evaluated_step
        fresh = [s for s in samples if s.step == newest][: self.config.batch_size] if unseen else []
        self.evaluated_step = max(self.evaluated_step, newest)
        before = self.evaluate(fresh, target)
        losses, tops = [], []
        for _ in range(self.config.updates_per_round):
            chosen = [eligible[self.rng.randrange(len(eligible))] for _ in range(self.config.batch_size)]
            batch = collate([samples[i] for i in chosen], weights[chosen], target.device, target.dtype)
            result = ttt_forward(self.head, target, batch, self.depths, self.temperature, self.config.loss)
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.optimizer.step()
            losses.append(float(result.loss.detach()))
            tops.append(result.top1)
        after = self.evaluate(fresh, target)
        self.updates += len(losses)
        self.version += 1
        self.version_step[self.version] = newest
        self.mailbox.publish(make_snapshot(self.head, self.version, {"step": newest}, self.publish_dtype))
        seconds = time.perf_counter() - started
        self.train_time_s += seconds
        acc = tuple(sum(t[d] for t in tops) / len(tops) for d in range(self.depths))
        return RoundResult(self.version, newest, len(losses), seconds, sum(losses) / len(losses), acc,
                           before.tau_sim if before else None, after.tau_sim if after else None)

    def _weights(self, samples: list[Sample]) -> torch.Tensor:
        if not samples:
            return torch.zeros(0)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        if self.config.weighting == "reward" and bool((rewards < 0).any()):
            if not self._warned_negative:
                warnings.warn("learner.weighting=reward: negative rewards count as 0 (use 'normalized' for "
                              "signed rewards)", RuntimeWarning, stacklevel=2)
                self._warned_negative = True
            rewards = rewards.clamp(min=0)
        advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        return reward_weights(rewards, advantages, self.config.weighting, self.config.weight_clip)

    @torch.no_grad()
    def evaluate(self, samples: list[Sample], target: FrozenTarget | DecoderLM) -> DistillResult | None:
        """Per-depth statistics of the learner's head on ``samples`` (unweighted, no gradient)."""
        if not samples:
            return None
        batch = collate(samples, None, target.device, target.dtype)
        return ttt_forward(self.head, target, batch, self.depths, self.temperature, self.config.loss)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"head": {n: t.detach().clone() for n, t in self.head.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "version": self.version, "updates": self.updates,
                "train_time_s": self.train_time_s, "buffer": self.buffer.state(), "rng": self.rng.getstate(),
                "version_step": dict(self.version_step), "evaluated_step": self.evaluated_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the learner and put the same weights (and version) in the engine's drafter."""
        with torch.no_grad():
            for name, tensor in self.head.state_dict().items():
                tensor.copy_(state["head"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self.updates, self.train_time_s = state["version"], state["updates"], state["train_time_s"]
        self.buffer.load_state(state["buffer"])
        self.rng.setstate(state["rng"])
        self.version_step = dict(state["version_step"])
        self.evaluated_step = state.get("evaluated_step", -1)
        snapshot = make_snapshot(self.head, self.version, {"step": self.version_step.get(self.version, 0)},
                                 self.publish_dtype)
        apply_snapshot(self.drafter.head, snapshot)
        self.drafter.version = self.version
        self.mailbox = Mailbox()
        self.drafter.subscribe(self.mailbox)
