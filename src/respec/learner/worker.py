"""When and where the online learner trains: sync, async every I steps, or triggered by staleness.

``sync``: the round runs in the trainer's thread after the actor's update (the step waits for it).
``async``: every ``every`` RL steps a round is handed to a background thread and overlaps the next
rollout; its weights are swapped in mid-rollout at a decode-step boundary as soon as they are
published. If a round is still running when the next one is due, the newer request replaces any
waiting one (the buffer already holds its samples), so the learner never falls behind by a queue.
``triggered``: a round is due when the live acceptance length falls ``trigger_drop`` below its level
right after the last update took effect (the first step sets the level before any update).

A learner that fails never stops the RL run: the error is kept and reported in the metrics, the
worker stops, and rollouts go on with the last good drafter.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import warnings

import torch

from ..models.decoder import DecoderLM
from .config import LearnerConfig
from .online import FrozenTarget, OnlineLearner, RoundResult


class TriggerPolicy:
    """Decides, from the acceptance length of each step, when a triggered learner updates.

    The level is the acceptance length of the first rollout drafted wholly by the newest published
    version (before any update: by the initial drafter); a rollout that began with an older version
    neither sets the level nor fires."""

    def __init__(self, drop: float, version: int = 0) -> None:
        self.drop = drop
        self.level: float | None = None
        self.version = version  # the newest published version; the level belongs to it

    def updated(self, version: int) -> None:
        """``version`` was published: wait for a rollout drafted by it to set the new level."""
        self.version, self.level = version, None

    def due(self, accept_len: float | None, drafted_by: int | None) -> bool:
        """``drafted_by``: the drafter version of the whole rollout (None if it changed mid-rollout)."""
        if accept_len is None or drafted_by != self.version:  # SD stayed off, or an older drafter
            return False
        if self.level is None:
            self.level = accept_len
            return False
        return accept_len < (1 - self.drop) * self.level


class LearnerWorker:
    def __init__(self, learner: OnlineLearner, config: LearnerConfig) -> None:
        self.learner, self.config = learner, config
        self.trigger = TriggerPolicy(config.trigger_drop, learner.version) if config.mode == "triggered" else None
        self.error: str | None = None
        self.rounds: list[RoundResult] = []
        self.wait_s = 0.0  # trainer-thread seconds spent on the learner (copies, sync rounds, joins)
        self._cond = threading.Condition()
        self._request: FrozenTarget | None = None
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        if config.mode in ("async", "triggered"):
            self._thread = threading.Thread(target=self._loop, name="respec-learner", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the trainer's side
    def after_update(self, actor: DecoderLM | None, step: int, accept_len: float | None,
                     drafted_by: int | None = None, target: FrozenTarget | None = None) -> None:
        """Called once per RL step, after the actor's update (its samples are in the buffer).
        ``drafted_by``: the drafter version of the whole rollout, None if a swap happened during it.
        ``target``: the frozen copy of the actor's parts, when the caller made it (another process)."""
        if self.error is not None or not self._due(step, accept_len, drafted_by) or not self.learner.ready():
            return
        started = time.perf_counter()
        target = target if target is not None else self.learner.frozen_target(actor)
        if self.config.mode == "sync":
            self._run_round(target)
        else:
            with self._cond:
                self._request = target
                self._cond.notify()
        self.wait_s += time.perf_counter() - started

    def _due(self, step: int, accept_len: float | None, drafted_by: int | None) -> bool:
        if self.trigger is not None:
            with self._cond:
                if self._busy or self._request is not None:  # a round is already on its way
                    return False
            return self.trigger.due(accept_len, drafted_by)
        return (step + 1) % self.config.every == 0

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until no round is running or waiting (checkpoints, the end of a run)."""
        started = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: not self._busy and self._request is None or self.error is not None
                                or self._thread is None, timeout)
        self.wait_s += time.perf_counter() - started

    def close(self) -> None:
        if self._thread is None:
            return
        self.wait_idle()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._thread = None

    # ------------------------------------------------------------------ the worker's side
    def _loop(self) -> None:
        if self.config.worker_nice and hasattr(os, "setpriority"):  # Linux: per-thread niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.worker_nice)
        if self.config.worker_threads:  # per thread: the trainer thread keeps its own count
            torch.set_num_threads(self.config.worker_threads)
        # On a GPU the rounds run on their own stream, so their kernels overlap the rollout's.
        stream = torch.cuda.Stream(self.learner.head.fc.weight.device) \
            if self.learner.head.fc.weight.is_cuda else None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._request is not None or self._stop)
                if self._stop:
                    return
                target, self._request, self._busy = self._request, None, True
            try:
                if stream is None:
                    self._run_round(target)
                else:
                    stream.wait_event(target.ready)
                    with torch.cuda.stream(stream):
                        self._run_round(target)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if self.error is not None:
                return

    def _run_round(self, target: FrozenTarget) -> None:
        try:
            result = self.learner.train_round(target)
        except Exception:  # noqa: BLE001 -- any learner failure: report it, keep rolling out
            self.error = traceback.format_exc()
            warnings.warn(f"online learner failed; rollouts go on with drafter v{self.learner.drafter.version}:\n"
                          f"{self.error}", RuntimeWarning, stacklevel=2)
            return
        if result.updates:
            self.rounds.append(result)
            if self.trigger is not None:
                self.trigger.updated(result.version)

    # ------------------------------------------------------------------ metrics
    def metrics(self, step: int) -> dict[str, float]:
        """``drafter/*`` for the step just taken (``step`` = steps completed so far).
        ``target_version_gap``: actor updates since the rollout whose samples the drafter in use last
        learned from."""
        learner, drafter = self.learner, self.learner.drafter
        in_use = drafter.version
        trained_on = learner.version_step.get(in_use, 0)
        out = {"drafter/version": float(in_use), "drafter/published": float(learner.version),
               "drafter/updates": float(learner.updates), "drafter/train_time_s": learner.train_time_s,
               "drafter/wait_s": self.wait_s, "drafter/target_version_gap": float(step - trained_on),
               "drafter/buffer_tokens": float(learner.buffer.num_tokens), "drafter/error": float(self.error is not None)}
        if self.rounds:
            last = self.rounds[-1]
            out["drafter/kd_loss"] = last.kd_loss
            for depth, acc in enumerate(last.acc_steps):
                out[f"drafter/acc_step_{depth}"] = acc
            if last.tau_sim_before is not None:
                out["drafter/tau_sim"] = last.tau_sim_before
                out["drafter/tau_sim_after"] = last.tau_sim_after
        return out

