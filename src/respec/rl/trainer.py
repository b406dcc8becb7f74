"""The GRPO training loop: rollout -> rewards -> advantages -> update -> online learner -> eval -> checkpoint.

The actor is ``self.llm.model``: the engine generates with the very modules the optimizer updates, so
the step after an update already samples from the new policy (no weight copy, no sync). Rollouts are
speculative (adaptive controller or one static drafter) or plain AR; their logprobs are the old
policy's logprobs of the clipped ratio.
"""

from __future__ import annotations

import copy
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.tasks import Problem, chat_prompt, load_task
from ..engine.llm import LLM
from ..engine.params import SamplingParams
from ..models.loading import load_weights
from .checkpoint import (
    checkpoint_step,
    clear_staging,
    load_trainer_state,
    resume_candidates,
    rng_state,
    save_checkpoint,
    set_aside_after,
    set_rng_state,
)
from .config import TaskConfig, TrainConfig, save_config
from .grpo import group_advantages
from .learner_hooks import make_online_learner, skipped_rows_filter
from .metrics import MetricsWriter
from .progress import step_line
from .remote_rollout import RemoteRollout, connect
from .rewards import RewardFn, combine, correctness_reward
from .rollout_stats import spec_delta, spec_snapshot
from .rundir import RunDirectory
from .update import Capture, UpdateBatch, grpo_update


@dataclass
class Rollout:
    problems: list[Problem]
    prompt_ids: list[list[int]]  # one per sample (group members repeat their prompt)
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    rewards: torch.Tensor
    advantages: torch.Tensor
    seconds: float
    stats: dict[str, float]


def make_llm(config: TrainConfig) -> LLM:
    r = config.rollout
    drafters = list(r.drafters) if r.speculative != "off" else None
    return LLM(config.model, device=config.device, dtype=config.dtype, max_num_seqs=r.max_num_seqs,
               drafter=drafters, speculative=r.engine_speculative(seed=config.seed))


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = False, resume_from: int | None = None,
                 overwrite: bool = False, allow_config_change: bool = False, directory: RunDirectory | None = None,
                 llm: LLM | None = None, reward_fn: RewardFn | None = None) -> None:
        """``resume``: continue the run in ``config.out_dir`` from its newest sound checkpoint (or the
        one of step ``resume_from``); ``overwrite``: move a run already there aside and start anew;
        ``allow_config_change``: resume although the config differs from the run's (see ``rundir``);
        ``directory``: ``config.out_dir`` already opened with these options (the CLI opens it first).
        ``reward_fn`` replaces the configured rewards (custom tasks, tests). The directory, the
        checkpoint and the steps are checked before the model loads."""
        self.config = config.validate()
        self.run_dir = Path(config.out_dir)
        self.progress = False  # train(progress=True): step lines and phase bars
        resume = resume or resume_from is not None
        self.directory = directory or RunDirectory(self.run_dir).open(
            config.to_dict(), resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
        self.remote: RemoteRollout | None = None
        self.connection = None
        try:
            self._start(config, resume, resume_from, llm, reward_fn)
        except BaseException:
            self._release()
            raise

    def _start(self, config: TrainConfig, resume: bool, resume_from: int | None, llm: LLM | None,
               reward_fn: RewardFn | None) -> None:
        candidates = self._resume_candidates(resume_from) if resume else []
        clear_staging(self.run_dir)  # saves that never finished: with the lock held, nobody owns them
        self.connection = connect(config)  # Ray, when rollouts are distributed: checked before the model loads
        torch.manual_seed(config.seed)
        self.llm = llm or make_llm(config)
        self.actor = self.llm.model
        self.actor.requires_grad_(True)
        self.task = config.task.stage(0)
        self.train_set, self.eval_set = _load(self.task, config.seed)
        self.reward_fn = reward_fn or combine(config.reward.weights)
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.actor.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (o.warmup_steps + 1)))
        self.reference = None
        if o.kl_coef > 0:  # a frozen copy of the initial policy
            self.reference = copy.deepcopy(self.actor).requires_grad_(False)
        self.step = 0
        self.epoch, self.position = 0, 0
        self.order = self._order(0)
        self._encoded: dict[str, list[int]] = {}
        self.ar_llm: LLM | None = None  # for paired AR timings (compare_ar)
        self.learner, self.learner_worker = make_online_learner(config, self.llm)
        self.ledger = {"drafter_train_s": 0.0, "rollout_saved_s": 0.0, "speedup": None}
        if candidates:
            self._resume(candidates, fall_back=resume_from is None)
        if self.connection is not None:
            self.remote = RemoteRollout(config, self.connection, self.llm, self.learner, self.step)
        save_config(config, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir, config.tensorboard, resume_after=self.step if resume else 0)

    # ------------------------------------------------------------------ data
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.RandomState(self.config.seed + epoch).permutation(len(self.train_set))

    def _enter_stage(self, step: int) -> None:
        """Switch to the task that trains logged step ``step`` (see ``TaskConfig.switch_at``)."""
        task = self.config.task.stage(step)
        if task is not self.task:
            self.task = task
            self.train_set, self.eval_set = _load(task, self.config.seed)
            self.epoch, self.position = 0, 0
            self.order = self._order(0)

    def next_problems(self) -> list[Problem]:
        self._enter_stage(self.step + 1)
        chosen = []
        for _ in range(self.config.rollout.prompts_per_step):
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            chosen.append(self.train_set[int(self.order[self.position])])
            self.position += 1
        return chosen

    def encode(self, problem: Problem) -> list[int]:
        if problem.question not in self._encoded:
            self._encoded[problem.question] = self.llm.encode(chat_prompt(problem), chat=True)
        return self._encoded[problem.question]

    # ------------------------------------------------------------------ phases
    def sampling_params(self, step: int, index: int) -> SamplingParams:
        r = self.config.rollout
        seed = zlib.crc32(f"{self.config.seed}/{step}/{index}".encode())
        return SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, seed=seed)

    def rollout(self, problems: list[Problem], step: int, llm: LLM | None = None) -> tuple[list, float, dict[str, float]]:
        """Sample every problem's group; seeds depend on (seed, ``step``, problem index) only."""
        llm = llm or self.remote or self.llm
        prompts = [self.encode(p) for p in problems]
        params = [self.sampling_params(step, i) for i in range(len(problems))]
        before = spec_snapshot(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params) if llm is self.remote else \
            llm.generate(prompts, params, progress=self.progress)
        seconds = time.perf_counter() - start
        return outputs, seconds, spec_delta(llm, before, seconds, len(problems) * self.config.rollout.group_size)

    def train_step(self) -> dict[str, float]:
        step_start = time.perf_counter()
        problems = self.next_problems()
        version_before = self.learner.drafter.version if self.learner is not None else None
        outputs, rollout_s, rollout_stats = self.rollout(problems, self.step)
        t0 = time.perf_counter()
        group = self.config.rollout.group_size
        samples = [s for o in outputs for s in o.samples]
        texts = [s.text for s in samples]
        gold = [p.answer for p in problems for _ in range(group)]
        rewards = torch.tensor(self.reward_fn(texts, gold), dtype=torch.float32)
        if not bool(torch.isfinite(rewards).all()):
            bad = int((~torch.isfinite(rewards)).nonzero()[0])
            raise ValueError(f"step {self.step + 1}: the reward of sample {bad} is {float(rewards[bad])}; rewards "
                             f"must be finite (the run stopped; its newest checkpoint is the last good one)")
        advantages = group_advantages(rewards, group, self.config.optim.advantage_scale)
        reward_s = time.perf_counter() - t0
        rollout = Rollout(problems, [o.prompt_token_ids for o in outputs for _ in o.samples],
                          [s.token_ids for s in samples], [s.logprobs for s in samples], texts, rewards,
                          advantages, rollout_s, rollout_stats)
        t0 = time.perf_counter()
        try:
            update = grpo_update(self.actor, self.optimizer, self.scheduler, self.config, _update_batch(rollout),
                                 self.reference, self._capture(rollout), progress=self.progress)
        except FloatingPointError as err:
            raise ValueError(f"step {self.step + 1}: {err}. Likely cause: a learning rate too large for this "
                             f"model (optim.lr = {self.config.optim.lr:g}); the run stopped and its newest "
                             f"checkpoint is the last good one") from None
        update_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        drafter = {}
        if self.learner_worker is not None:
            version = self.learner.drafter.version
            drafted_by = self.remote.drafted_by(outputs) if self.remote else \
                version if version == version_before else None
            self.learner_worker.after_update(self.actor, self.step, rollout_stats.get("sd/accept_len"), drafted_by)
        drafter_s = time.perf_counter() - t0
        self.step += 1
        if self.remote is not None:  # the workers sample the next step from the updated actor
            drafter["timing_s/weight_sync"] = self.remote.after_update(self.actor, self.step)
            drafter.update(self.remote.metrics())
        if self.learner_worker is not None:
            drafter.update(self.learner_worker.metrics(self.step))
        grouped = rewards.view(-1, group)
        metrics = {
            "train/reward": float(rewards.mean()), "train/reward_std": float(rewards.std()),
            "train/frac_reward_zero_std": float((grouped.std(dim=1) == 0).float().mean()),
            "train/accuracy": float(np.mean(correctness_reward(texts, gold))),
            "train/response_length": float(np.mean([len(t) for t in rollout.token_ids])),
            **update, **rollout_stats, **drafter,
            "timing_s/rollout": rollout_s, "timing_s/reward": reward_s, "timing_s/update": update_s,
            "timing_s/drafter": drafter_s,
        }
        if self.config.task.switch_to is not None:
            metrics["task/stage"] = float(self.task is self.config.task.switch_to)
        metrics.update(self._compare_ar(problems, rollout_s))
        metrics.update(self._ledger(metrics))
        metrics["timing_s/step"] = time.perf_counter() - step_start
        return metrics

    def _capture(self, rollout: Rollout) -> Capture | None:
        """The learner's share of the update's forward: features + logits of each row, with its reward."""
        if self.learner is None:
            return None
        rewards, advantages, step = rollout.rewards.tolist(), rollout.advantages.tolist(), self.step

        def keep(micro, captured, logits) -> None:
            self.learner.capture(micro.ids, micro.lengths, micro.prompt_lens, captured, logits,
                                 [rewards[r] for r in micro.rows], [advantages[r] for r in micro.rows], step)

        extra = skipped_rows_filter(self.config.learner, rewards) if self.config.learner.capture_skipped_rows else None
        return Capture(self.learner.fuse_layers, keep, extra)

    def _ledger(self, metrics: dict[str, float]) -> dict[str, float]:
        """Drafter-training seconds spent vs rollout seconds saved (from the latest paired AR timing)."""
        if "rollout/sd_speedup" in metrics:
            self.ledger["speedup"] = metrics["rollout/sd_speedup"]
        if self.ledger["speedup"] is not None:
            self.ledger["rollout_saved_s"] += metrics["timing_s/rollout"] * (self.ledger["speedup"] - 1)
        if self.learner is not None:
            self.ledger["drafter_train_s"] = self.learner.train_time_s
        if self.ledger["speedup"] is None and self.learner is None:
            return {}
        return {"ledger/drafter_train_s": self.ledger["drafter_train_s"],
                "ledger/rollout_saved_s": self.ledger["rollout_saved_s"]}

    def _compare_ar(self, problems: list[Problem], rollout_s: float) -> dict[str, float]:
        """The same prompts and seeds through plain AR decoding, timed (not trained on)."""
        every = self.config.rollout.compare_ar_every
        if not every or self.config.rollout.speculative == "off" or self.step % every:
            return {}
        if self.ar_llm is None:
            self.ar_llm = LLM(self.actor, tokenizer=self.llm.tokenizer, max_num_seqs=self.config.rollout.max_num_seqs)
        _, ar_s, _ = self.rollout(problems, self.step - 1, self.ar_llm)  # the seeds of the step just taken
        return {"rollout/ar_time_s": ar_s, "rollout/sd_speedup": ar_s / rollout_s}

    @torch.no_grad()
    def evaluate(self) -> float:
        prompts = [self.encode(p) for p in self.eval_set]
        params = SamplingParams(temperature=0, max_new_tokens=self.config.eval_max_new_tokens)
        outputs = self.llm.generate(prompts, params, progress=self.progress)
        texts = [o.samples[0].text for o in outputs]
        return float(np.mean(correctness_reward(texts, [p.answer for p in self.eval_set])))

    # ------------------------------------------------------------------ the loop
    def train(self, progress: bool = True) -> dict[str, float]:
        """Run to ``config.steps``. ``progress``: a line per step (``progress.step_line``) and a bar
        inside each long phase (generation, the update's micro-batches)."""
        config, summary = self.config, {}
        self.progress = progress
        try:
            if self.step == 0 and config.eval_every:
                summary["eval/accuracy_before"] = self._log_eval()
                self._say(f"step 0/{config.steps}  eval {summary['eval/accuracy_before']:.2f}")
            start, first = time.perf_counter(), self.step
            while self.step < config.steps:
                metrics = self.train_step()
                self.metrics.log(self.step, metrics)
                last, accuracy = self.step == config.steps, None
                if config.eval_every and (self.step % config.eval_every == 0 or last):
                    accuracy = summary["eval/accuracy"] = self._log_eval()
                if (config.checkpoint_every and self.step % config.checkpoint_every == 0) or last:
                    self.save()
                per_step = (time.perf_counter() - start) / (self.step - first)
                self._say(step_line(self.step, config.steps, metrics, accuracy, per_step * (config.steps - self.step)))
        finally:
            self.close()
        return summary

    def _say(self, line: str) -> None:
        if self.progress:
            tqdm.write(line)

    def close(self) -> None:
        """Stop the learner's thread (after its last round), flush the metrics, release the directory."""
        if self.learner_worker is not None:
            self.learner_worker.close()
        self.metrics.close()
        self._release()

    def _release(self) -> None:
        """The rollout workers (and a Ray instance this run started), then the run directory."""
        if self.remote is not None:
            self.remote.close()
        elif self.connection is not None:
            self.connection.close()
        self.remote = self.connection = None
        self.directory.close()

    def _log_eval(self) -> float:
        accuracy = self.evaluate()
        self.metrics.log(self.step, {"eval/accuracy": accuracy})
        return accuracy

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        learner = None
        if self.learner is not None:
            self.learner_worker.wait_idle()  # a consistent head + optimizer + version
            learner = self.learner.state_dict()
        return {"learner": learner, "ledger": dict(self.ledger), "step": self.step, "epoch": self.epoch,
                "position": self.position, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "drafters": {n: d.get_state() for n, d in self.llm.drafters.items()},
                "reference": self.reference.state_dict() if self.reference is not None else None}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.actor, self.state(), tokenizer=self.llm.tokenizer,
                               keep_last=self.config.keep_last, owner=self.directory.identity["run_id"])

    def _resume_candidates(self, step: int | None) -> list[Path]:
        """The checkpoints a resume may start from (see ``checkpoint.resume_candidates``), checked to
        leave steps to run."""
        candidates = resume_candidates(self.run_dir, step)
        if not candidates:
            raise ValueError(f"resume: no sound complete checkpoint under {self.run_dir / 'checkpoints'}")
        done = checkpoint_step(candidates[0])
        if self.config.steps <= done:
            raise ValueError(f"steps: {self.config.steps}, but the checkpoint to resume ({candidates[0].name}) has "
                             f"run {done} steps already; raise steps to continue")
        return candidates

    def _resume(self, candidates: list[Path], fall_back: bool) -> None:
        """Load the first candidate that loads (a damaged one is reported and, when ``fall_back``, the
        next tried), set aside the checkpoints past it and record the resume."""
        for index, path in enumerate(candidates):
            try:
                state = load_trainer_state(path)
                load_weights(self.actor, path / "actor")
                break
            except ValueError as err:
                if not fall_back or index == len(candidates) - 1:
                    raise
                warnings.warn(f"{err}; falling back to {candidates[index + 1].name}", RuntimeWarning, stacklevel=2)
        aside = set_aside_after(self.run_dir, checkpoint_step(path))
        if aside is not None:
            warnings.warn(f"the run resumes from {path.name}: the checkpoints after it are now in {aside}",
                          RuntimeWarning, stacklevel=2)
        self.directory.record_resume(checkpoint_step(path))
        self._load_state(state)

    def _load_state(self, state: dict) -> None:
        self._enter_stage(state["step"])  # the task of the last step taken: epoch and position are its
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.order = self._order(self.epoch)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        for name, drafter_state in state["drafters"].items():
            if name in self.llm.drafters:
                self.llm.drafters[name].set_state(drafter_state)
        if self.reference is not None and state["reference"] is not None:
            self.reference.load_state_dict(state["reference"])
        if self.learner is not None and state.get("learner") is not None:
            self.learner.load_state_dict(state["learner"])
        self.ledger = state.get("ledger", self.ledger)


def _load(task: TaskConfig, seed: int) -> tuple[list[Problem], list[Problem]]:
    return load_task(task.name, task.num_train, task.num_eval, seed, task.path, tuple(task.levels))


def _update_batch(rollout: Rollout) -> UpdateBatch:
    return UpdateBatch(prompt_ids=rollout.prompt_ids, token_ids=rollout.token_ids, logprobs=rollout.logprobs,
                       advantages=rollout.advantages)
