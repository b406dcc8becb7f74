"""The training configuration: one dataclass per component, YAML plus dotted overrides, checked in one place.

``load_config("configs/smollm2-arith.yaml", ["rollout.temperature=0.6", "steps=40"])`` reads the file,
applies the overrides (values parsed as YAML scalars), rejects unknown keys naming their full path,
and validates every field; the resolved config is saved with each run. The ``learner`` section is the
learner's own ``LearnerConfig``; ``rollout.controller`` is the engine's ``ControllerConfig``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.tasks import LEVELS, TASK_NAMES, load_task
from ..distributed.config import DistributedConfig
from ..engine.device import check_dtype_name, parse_device
from ..engine.speculation import MAX_DRAFT_TOKENS, ControllerConfig, resolve_speculative
from ..learner.config import LearnerConfig
from ..utils.atomic import write_text_atomic
from ..utils.configs import apply_overrides, from_dict, read_yaml_file, require
from ..utils.paths import gsm8k_path
from .rewards import REWARDS


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # "arithmetic" or "gsm8k"
    path: str | None = None  # JSONL for gsm8k
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    num_train: int = 2000
    num_eval: int = 200
    # A task switch half-way (a distribution shift for the actor and its drafter): from step
    # ``switch_at`` on (1-based, as logged) problems and evaluation come from ``switch_to``.
    switch_at: int = 0  # 0: never
    switch_to: TaskConfig | None = None

    def validate(self, prefix: str = "task") -> None:
        require(self.name in TASK_NAMES, f"{prefix}.name", f"must be one of {TASK_NAMES}, got {self.name!r}")
        require(self.num_train >= 1, f"{prefix}.num_train", f"must be >= 1, got {self.num_train}")
        require(self.num_eval >= 1, f"{prefix}.num_eval", f"must be >= 1, got {self.num_eval}")
        require(self.switch_at >= 0, f"{prefix}.switch_at", f"must be >= 0, got {self.switch_at}")
        require((self.switch_at > 0) == (self.switch_to is not None), f"{prefix}.switch_at",
                 "switch_at and switch_to go together: give both (a step >= 1 and a task) or neither")
        if self.name == "arithmetic":
            bad = [level for level in self.levels if level not in LEVELS]
            require(bool(self.levels) and not bad, f"{prefix}.levels",
                    f"must be a non-empty subset of {sorted(LEVELS)}, got {self.levels}")
        else:  # the file is read now, so a missing file or a bad row fails before the model loads
            self.path = str(Path(self.path).resolve()) if self.path else str(gsm8k_path() or "") or None
            try:
                load_task(self.name, self.num_train, self.num_eval, 0, self.path, tuple(self.levels))
            except ValueError as err:
                message = str(err)
                raise ValueError(f"{prefix}.path: {message}" if message.startswith("data:")
                                 else f"{prefix}.{message}") from None
        if self.switch_to is not None:
            require(self.switch_to.switch_to is None, f"{prefix}.switch_to.switch_to", "one switch per run")
            self.switch_to.validate(f"{prefix}.switch_to")

    def stage(self, step: int) -> TaskConfig:
        """The task that trains logged step ``step`` (1-based)."""
        return self.switch_to if self.switch_to is not None and step >= self.switch_at else self


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 4
    batch_size: int | None = None  # samples per step; must equal prompts_per_step x group_size when given
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    # As ``LLM(speculative=...)``: "off", an int k (``drafters`` holds one drafter, k drafts every step)
    # or "adaptive" (``controller`` picks off or a (drafter, k) every decode step).
    speculative: int | str = "adaptive"
    drafters: list[str] = field(default_factory=lambda: ["ngram"])
    controller: ControllerConfig = field(default_factory=lambda: ControllerConfig(max_draft_tokens=4))
    max_num_seqs: int = 64
    compare_ar_every: int = 0  # every N steps also time an AR rollout of the same prompts (not trained on)
    k: int | None = None  # deprecated: speculative=K (static) or controller.max_draft_tokens=K (adaptive)

    def validate(self) -> None:
        require(self.group_size >= 2, "rollout.group_size", f"must be >= 2 (GRPO compares samples), got {self.group_size}")
        require(self.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        if self.batch_size is not None:
            require(self.batch_size % self.group_size == 0, "rollout.batch_size",
                    f"{self.batch_size} is not divisible by group_size {self.group_size}")
            self.prompts_per_step = self.batch_size // self.group_size
        require(self.temperature >= 0, "rollout.temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "rollout.top_k", f"must be >= 0, got {self.top_k}")
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.compare_ar_every >= 0, "rollout.compare_ar_every", f"must be >= 0, got {self.compare_ar_every}")
        self.upgrade_deprecated()
        if self.speculative != "off":
            require(bool(self.drafters), "rollout.drafters", "empty; name at least one drafter or set speculative=off")
        try:
            resolve_speculative(self.engine_speculative(), self.drafters if self.speculative != "off" else [])
        except ValueError as err:
            raise ValueError(f"rollout.{err}") from None

    def upgrade_deprecated(self) -> None:
        """``speculative: static`` with ``k: K`` (K was 4 when not given), and ``k`` with adaptive, from
        older configs, with a warning."""
        if self.speculative == "static" and self.k is None:
            self.k = 4
        if self.k is None:
            return
        require(isinstance(self.k, int) and 1 <= self.k <= MAX_DRAFT_TOKENS, "rollout.k",
                f"must be in [1, {MAX_DRAFT_TOKENS}], got {self.k}")
        if self.speculative == "static":
            warnings.warn(f"rollout.speculative=static is deprecated: write rollout.speculative={self.k}",
                          FutureWarning, stacklevel=4)
            self.speculative = self.k
        elif self.speculative == "adaptive":
            warnings.warn(f"rollout.k is deprecated: write rollout.controller.max_draft_tokens={self.k}",
                          FutureWarning, stacklevel=4)
            self.controller = dataclasses.replace(self.controller, max_draft_tokens=self.k)
        else:
            require(self.speculative in ("off", self.k), "rollout.k",
                    f"is deprecated and contradicts rollout.speculative={self.speculative}; drop it")
        self.k = None

    def engine_speculative(self, seed: int | None = None) -> int | str | ControllerConfig:
        """The value for ``LLM(speculative=...)``; an adaptive controller without a seed gets ``seed``."""
        if self.speculative != "adaptive":
            return self.speculative
        if self.controller.seed is None and seed is not None:
            return dataclasses.replace(self.controller, seed=seed)
        return self.controller

    @property
    def max_k(self) -> int:
        """The most drafts a step may carry (0 without speculation)."""
        if self.speculative == "off":
            return 0
        return self.speculative if isinstance(self.speculative, int) else max(self.controller.ks)


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"correctness": 1.0})

    def validate(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARDS))
        require(bool(self.weights) and not unknown, "reward.weights",
                 f"unknown reward(s) {unknown}; choose from {sorted(REWARDS)}" if unknown else "empty")


@dataclass
class OptimConfig:
    lr: float = 2e-6
    warmup_steps: int = 2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    advantage_scale: str = "std"  # "std" (GRPO) or "none" (mean-only)
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy of the actor

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.micro_batch_size >= 1, "optim.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.advantage_scale in ("std", "none"), "optim.advantage_scale",
                 f"must be 'std' or 'none', got {self.advantage_scale!r}")
        require(0 <= self.clip_low < 1 and self.clip_high >= 0, "optim.clip_low",
                 f"clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        require(self.kl_coef >= 0, "optim.kl_coef", f"must be >= 0, got {self.kl_coef}")
        require(self.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    out_dir: str = "runs/run"
    seed: int = 0
    steps: int = 20
    eval_every: int = 10  # also before the first step and after the last
    eval_max_new_tokens: int = 128
    checkpoint_every: int = 10  # 0 = only at the end
    keep_last: int = 2
    tensorboard: bool = False
    device: str | None = None
    dtype: str | None = None
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # Rollouts on N Ray workers (``distributed.rollout_workers=N``); the default runs them in-process.
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> TrainConfig:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        require(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None, "tensorboard",
                "the 'tensorboard' package is not installed; pip install tensorboard, or set tensorboard=false")
        check_dtype_name(self.dtype)
        if self.device is not None:  # this machine can run it: checked before anything loads
            parse_device(self.device)
        for section in (self.task, self.rollout, self.reward, self.optim, self.learner):
            section.validate()
        self.distributed.validate()
        self._check_learner()
        return self

    def _check_learner(self) -> None:
        """The learner trains one of the rollout's drafters, so it needs speculation on."""
        learner, rollout = self.learner, self.rollout
        if learner.mode == "off":
            return
        require(rollout.speculative != "off", "learner.mode",
                f"{learner.mode!r} trains a drafter, but rollout.speculative is 'off'")
        if learner.drafter is not None:
            require(learner.drafter in rollout.drafters, "learner.drafter",
                    f"{learner.drafter!r} is not one of rollout.drafters {rollout.drafters}")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    """Tuples as lists, for YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data = read_yaml_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(data, TrainConfig).validate()


def save_config(config: TrainConfig, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
