"""The online learner as its own Ray actor, and the trainer-side handle that stands in for it.

``LearnerActor`` holds the learner's head, optimizer and sample buffer, and runs rounds in its own
process (async/triggered: in its background thread, as in one process). The trainer reduces each
micro-batch of its training forward to learner samples (target features and top-k/draft-vocabulary
logits, as ``capture_micro_batch`` does in one process) and sends them by object reference; after the
actor's update it sends the frozen embedding/rope copy the round reads, also by reference. Published
heads are read back through ``RemoteSource`` (``.version``/``.latest()``, like a ``Mailbox``), which
the rollout pool forwards to every worker.

A learner actor that raises or dies never stops the run: ``RemoteLearner`` keeps the error, warns
once, reports ``drafter/error = 1`` and stops calling it; rollouts go on with the last good drafter.
"""

from __future__ import annotations

import traceback
import warnings

import torch

from ..engine.snapshots import DrafterSnapshot, apply_snapshot
from ..learner.buffer import Sample, capture_micro_batch
from ..learner.config import LearnerConfig
from ..learner.online import FrozenTarget, OnlineLearner
from ..learner.worker import LearnerWorker
from .cluster import require_ray


class HeadHolder:
    """What the learner needs of a drafter, without the target model: the head and its version."""

    def __init__(self, head: torch.nn.Module, version: int) -> None:
        self.head, self.version, self.source = head, version, None

    def learnable(self) -> torch.nn.Module:
        return self.head

    def subscribe(self, source) -> None:
        self.source = source


class LearnerActor:
    def __init__(self, head: torch.nn.Module, version: int, config: LearnerConfig, depths: int,
                 temperature: float, seed: int, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.learner = OnlineLearner(HeadHolder(head, version), config, depths, temperature, seed=seed)
        self.worker = LearnerWorker(self.learner, config)

    def add_samples(self, samples: list[Sample]) -> int:
        self.learner.buffer.add(samples)
        return self.learner.buffer.num_tokens

    def after_update(self, target: FrozenTarget, step: int, accept_len: float | None, drafted_by: int | None) -> None:
        """Queue a round (async/triggered: returns at once; sync: after the round)."""
        self.worker.after_update(None, step, accept_len, drafted_by, target=target)

    def version(self) -> int:
        return self.learner.version

    def latest(self) -> DrafterSnapshot | None:
        return self.learner.mailbox.latest()

    def metrics(self, step: int) -> dict[str, float]:
        out = self.worker.metrics(step)
        if self.worker.error is not None:
            out["drafter/error_text"] = self.worker.error.strip().splitlines()[-1]
        return out

    def wait_idle(self) -> None:
        self.worker.wait_idle()

    def state_dict(self) -> dict:
        self.worker.wait_idle()
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def close(self) -> None:
        self.worker.close()


class RemoteSource:
    """The actor's published heads as a mailbox-like source; ``version`` never blocks."""

    def __init__(self, owner: RemoteLearner) -> None:
        self.owner, self._version, self._snapshot = owner, owner.initial_version, None
        self._pending = owner.call("version")

    @property
    def version(self) -> int:
        ray = self.owner.ray
        if self._pending is not None and ray.wait([self._pending], timeout=0)[0]:
            value = self.owner.get(self._pending)
            self._version = max(self._version, value) if value is not None else self._version
            self._pending = self.owner.call("version")
        return self._version

    def latest(self) -> DrafterSnapshot | None:
        if self._snapshot is None or self._snapshot.version < self._version:
            ref = self.owner.call("latest")
            snapshot = self.owner.get(ref) if ref is not None else None
            self._snapshot = snapshot or self._snapshot
        return self._snapshot


class RemoteLearner:
    """The trainer's handle on a ``LearnerActor``: the learner and learner-worker calls it makes."""

    def __init__(self, drafter, config: LearnerConfig, depths: int, temperature: float, seed: int,
                 num_cpus: float = 1.0) -> None:
        self.ray = require_ray()
        self.drafter, self.config, self.temperature = drafter, config, temperature
        self.error: str | None = None
        self.initial_version = self.version = drafter.version
        self.publish_dtype = next(drafter.head.parameters()).dtype
        self.fuse_layers = tuple(drafter.head.config.fuse_layers)
        self.draft_vocab = drafter.head.draft_to_target if drafter.head.draft_head is not None else None
        self.with_head = drafter.head.draft_head is None
        self.train_time_s, self._metrics = 0.0, {}
        actor = self.ray.remote(LearnerActor).options(num_cpus=num_cpus, max_concurrency=4, max_restarts=0)
        self.actor = actor.remote(drafter.head, drafter.version, config, depths, temperature, seed,
                                  max(1, int(num_cpus)))
        self.mailbox = RemoteSource(self)
        drafter.subscribe(self.mailbox)

    # ------------------------------------------------------------------ calls that may fail
    def call(self, method: str, *args):
        if self.error is not None:
            return None
        return getattr(self.actor, method).remote(*args)

    def get(self, ref, timeout: float | None = None):
        if ref is None or self.error is not None:
            return None
        try:
            return self.ray.get(ref, timeout=timeout)
        except Exception as err:  # noqa: BLE001 -- the actor raised or died: report it, roll out on
            self._fail(err)
            return None

    def _fail(self, err: BaseException) -> None:
        self.error = "".join(traceback.format_exception_only(type(err), err)).strip()
        warnings.warn(f"online learner actor failed; rollouts go on with drafter v{self.version}:\n{self.error}",
                      RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the learner's side
    def capture(self, ids, lengths, prompt_lens, captured, logits, rewards, advantages, step) -> None:
        samples = capture_micro_batch(ids, lengths, prompt_lens, captured, logits, self.fuse_layers,
                                      self.draft_vocab, rewards, advantages, step, self.temperature,
                                      self.config.logits_top_k)
        if samples and self.error is None:  # waited for: the actor's threads keep no call order
            self.get(self.call("add_samples", self.ray.put(samples)))

    def state_dict(self) -> dict | None:
        return self.get(self.call("state_dict"))

    def load_state_dict(self, state: dict) -> None:
        self.get(self.call("load_state_dict", state))
        snapshot = self.mailbox.latest() if state["version"] > 0 else None
        if snapshot is not None:
            apply_snapshot(self.drafter.head, snapshot)
            self.drafter.version = self.version = snapshot.version

    # ------------------------------------------------------------------ the worker's side
    def after_update(self, actor, step: int, accept_len: float | None, drafted_by: int | None = None) -> None:
        if self.error is None:
            target = FrozenTarget(actor, with_head=self.with_head, dtype=torch.float32)
            self.get(self.call("after_update", self.ray.put(target), step, accept_len, drafted_by))

    def metrics(self, step: int) -> dict[str, float]:
        got = self.get(self.call("metrics", step), timeout=60)
        if got is not None:
            self._metrics = got
            if got.get("drafter/error") == 1.0:  # a round raised inside the actor
                self._fail(RuntimeError(got.get("drafter/error_text", "unknown error")))
        self.version = max(self.version, int(self._metrics.get("drafter/published", self.version)))
        self.train_time_s = self._metrics.get("drafter/train_time_s", self.train_time_s)
        out = {k: v for k, v in self._metrics.items() if isinstance(v, float)}
        out["drafter/version"] = float(self.drafter.version)
        if self.error is not None:
            out["drafter/error"] = 1.0
        return out

    def wait_idle(self, timeout: float | None = None) -> None:
        self.get(self.call("wait_idle"), timeout=timeout)

    def close(self) -> None:
        if self.error is None:
            self.get(self.call("close"), timeout=120)
        try:
            self.ray.kill(self.actor)
        except Exception:  # noqa: BLE001 -- already gone
            pass
