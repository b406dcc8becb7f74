"""Training configuration: one dataclass per component, YAML plus dotted overrides, checked in one place.

``load_config("configs/smollm2-arith.yaml", ["rollout.temperature=0.6", "steps=40"])`` reads the file,
applies the overrides (values parsed as YAML scalars), rejects unknown keys naming their full path,
and validates every field; the resolved config is saved with each run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .rl.tasks import TASK_NAMES


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
        _require(self.name in TASK_NAMES, f"{prefix}.name", f"must be one of {TASK_NAMES}, got {self.name!r}")
        _require(self.num_train >= 1, f"{prefix}.num_train", f"must be >= 1, got {self.num_train}")
        _require(self.num_eval >= 1, f"{prefix}.num_eval", f"must be >= 1, got {self.num_eval}")
        _require(self.switch_at >= 0, f"{prefix}.switch_at", f"must be >= 0, got {self.switch_at}")
        _require((self.switch_at > 0) == (self.switch_to is not None), f"{prefix}.switch_at",
                 "switch_at and switch_to go together: give both (a step >= 1 and a task) or neither")
        if self.switch_to is not None:
            _require(self.switch_to.switch_to is None, f"{prefix}.switch_to.switch_to", "one switch per run")
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
    speculative: str = "adaptive"  # "off", "static" (one drafter at k) or "adaptive"
    drafters: list[str] = field(default_factory=lambda: ["ngram"])
    k: int = 4  # static k, or the largest k the controller may pick
    max_num_seqs: int = 64
    compare_ar_every: int = 0  # every N steps also time an AR rollout of the same prompts (not trained on)

    def validate(self) -> None:
        _require(self.group_size >= 2, "rollout.group_size", f"must be >= 2 (GRPO compares samples), got {self.group_size}")
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        if self.batch_size is not None:
            _require(self.batch_size % self.group_size == 0, "rollout.batch_size",
                     f"{self.batch_size} is not divisible by group_size {self.group_size}")
            self.prompts_per_step = self.batch_size // self.group_size
        _require(self.temperature >= 0, "rollout.temperature", f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "rollout.top_k", f"must be >= 0, got {self.top_k}")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(self.speculative in ("off", "static", "adaptive"), "rollout.speculative",
                 f"must be 'off', 'static' or 'adaptive', got {self.speculative!r}")
        _require(self.compare_ar_every >= 0, "rollout.compare_ar_every", f"must be >= 0, got {self.compare_ar_every}")
        _require(1 <= self.k <= 32, "rollout.k", f"must be in [1, 32], got {self.k}")
        if self.speculative != "off":
            _require(bool(self.drafters), "rollout.drafters", "empty; name at least one drafter or set speculative=off")
        if self.speculative == "static":
            _require(len(self.drafters) == 1, "rollout.drafters", "static speculation takes exactly one drafter")


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"correctness": 1.0})

    def validate(self) -> None:
        from .rl.rewards import REWARDS

        unknown = sorted(set(self.weights) - set(REWARDS))
        _require(bool(self.weights) and not unknown, "reward.weights",
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
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.micro_batch_size >= 1, "optim.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.advantage_scale in ("std", "none"), "optim.advantage_scale",
                 f"must be 'std' or 'none', got {self.advantage_scale!r}")
        _require(0 <= self.clip_low < 1 and self.clip_high >= 0, "optim.clip_low",
                 f"clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        _require(self.kl_coef >= 0, "optim.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _require(self.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {self.grad_clip}")


@dataclass
class LearnerConfig:
    """The online drafter learner (off unless ``mode`` says otherwise)."""

    mode: str = "off"  # "off", "sync", "async" (every ``every`` steps) or "triggered"
    drafter: str | None = None  # which of rollout.drafters to train (default: the first EAGLE head)
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | tv
    weighting: str = "reward"  # none | reward | normalized | positive_advantage
    weight_clip: float = 5.0  # for "normalized"
    every: int = 1  # async: one update round every I RL steps
    trigger_drop: float = 0.1  # triggered: update when accept_len falls this fraction below its post-update level
    updates_per_round: int = 8  # optimizer steps per round
    batch_size: int = 8  # sequences per optimizer step
    lr: float = 3e-4
    grad_clip: float = 1.0
    depths: int | None = None  # training-time-test unroll (default: rollout.k)
    temperature: float | None = None  # distillation temperature (default: the rollout's, 1 when greedy)
    buffer_tokens: int = 32768  # bound on the sample buffer (a few recent steps), oldest samples evicted first
    logits_top_k: int = 0  # 0: keep the full (draft-vocabulary) logits; K: top-K logprobs + the rest's mass
    min_buffer_tokens: int = 256  # no round before the buffer holds this many tokens
    # Rows the GRPO update skips (zero advantage, e.g. all-correct groups) get an extra forward without
    # gradient so the learner sees them too; off keeps the learner strictly free of extra passes.
    capture_skipped_rows: bool = False
    # CPU: niceness of the async worker thread (0-19). Above 0 it yields the cores to generation and
    # the update and trains in their idle gaps, at the price of rounds that may take longer.
    worker_nice: int = 0
    # CPU: intra-op threads of the async worker (its own setting; generation keeps its threads).
    # 0 = the process's default.
    worker_threads: int = 0

    def validate(self, rollout: RolloutConfig) -> None:
        from .learner.losses import DIVERGENCES, REWARD_WEIGHTS

        _require(self.mode in ("off", "sync", "async", "triggered"), "learner.mode",
                 f"must be 'off', 'sync', 'async' or 'triggered', got {self.mode!r}")
        _require(self.loss in DIVERGENCES, "learner.loss", f"must be one of {DIVERGENCES}, got {self.loss!r}")
        _require(self.weighting in REWARD_WEIGHTS, "learner.weighting",
                 f"must be one of {REWARD_WEIGHTS}, got {self.weighting!r}")
        for name in ("every", "updates_per_round", "batch_size", "buffer_tokens"):
            _require(getattr(self, name) >= 1, f"learner.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(0 < self.trigger_drop < 1, "learner.trigger_drop", f"must be in (0, 1), got {self.trigger_drop}")
        _require(self.lr > 0, "learner.lr", f"must be > 0, got {self.lr}")
        _require(self.grad_clip > 0, "learner.grad_clip", f"must be > 0, got {self.grad_clip}")
        _require(self.weight_clip > 0, "learner.weight_clip", f"must be > 0, got {self.weight_clip}")
        _require(self.logits_top_k >= 0, "learner.logits_top_k", f"must be >= 0, got {self.logits_top_k}")
        _require(self.worker_threads >= 0, "learner.worker_threads", f"must be >= 0, got {self.worker_threads}")
        _require(0 <= self.worker_nice <= 19, "learner.worker_nice", f"must be in [0, 19], got {self.worker_nice}")
        _require(self.min_buffer_tokens >= 0, "learner.min_buffer_tokens", f"must be >= 0, got {self.min_buffer_tokens}")
        if self.depths is not None:
            _require(1 <= self.depths <= 32, "learner.depths", f"must be in [1, 32], got {self.depths}")
        if self.temperature is not None:
            _require(self.temperature > 0, "learner.temperature", f"must be > 0, got {self.temperature}")
        if self.mode != "off":
            _require(rollout.speculative != "off", "learner.mode",
                     f"{self.mode!r} trains a drafter, but rollout.speculative is 'off'")
            if self.drafter is not None:
                _require(self.drafter in rollout.drafters, "learner.drafter",
                         f"{self.drafter!r} is not one of rollout.drafters {rollout.drafters}")
                if rollout.speculative == "static":  # only the first drafter is loaded
                    _require(self.drafter == rollout.drafters[0], "learner.drafter",
                             f"{self.drafter!r}: static speculation drafts with rollout.drafters[0] only")

    def resolved_depths(self, rollout: RolloutConfig) -> int:
        return self.depths or rollout.k

    def resolved_temperature(self, rollout: RolloutConfig) -> float:
        return self.temperature or (rollout.temperature if rollout.temperature > 0 else 1.0)


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

    def validate(self) -> TrainConfig:
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        _require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        for section in (self.task, self.rollout, self.reward, self.optim):
            section.validate()
        self.learner.validate(self.rollout)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.1 also reads on/off/yes/no as booleans, which would
    turn ``speculative: off`` into False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


# ------------------------------------------------------------------------------ building from data

def from_dict(data: dict[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build ``cls`` from nested dicts, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(value or {}, hint, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(value or {}, hint, f"{name}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(v, item, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` pairs onto nested dicts (values parsed as YAML scalars: 0.6, true, null, a,b)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part} is not a section")
        node[parts[-1]] = _yaml(raw) if raw else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: {path} does not exist")
        try:
            data = _yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config: {path} is not valid YAML: {err}") from err
    data = apply_overrides(data, overrides or [])
    return from_dict(data).validate()


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
