"""Wiring the online learner into a GRPO run: which drafter it trains and which rows it sees."""

from __future__ import annotations

from collections.abc import Callable

from ..distributed.learner_actor import RemoteLearner
from ..engine.drafters.eagle import EagleDrafter
from ..engine.llm import LLM
from ..learner.config import LearnerConfig
from ..learner.online import OnlineLearner
from ..learner.worker import LearnerWorker
from .config import TrainConfig


def make_online_learner(config: TrainConfig, llm: LLM) -> tuple:
    """(learner, its worker): in this process, or one ``RemoteLearner`` for both (a Ray actor)."""
    learner_config = config.learner
    if learner_config.mode == "off":
        return None, None
    drafter = _learned_drafter(learner_config, config.rollout.drafters, llm)
    rollout = config.rollout
    depths = learner_config.depths or rollout.max_k  # the unroll trains the drafts the rollout asks for
    temperature = learner_config.temperature or (rollout.temperature if rollout.temperature > 0 else 1.0)
    dist = config.distributed
    if dist.enabled and dist.learner_actor and learner_config.mode in ("async", "triggered"):
        remote = RemoteLearner(drafter, learner_config, depths, temperature, config.seed, dist.num_cpus)
        return remote, remote  # the learner and its worker, both in a Ray actor
    learner = OnlineLearner(drafter, learner_config, depths, temperature, seed=config.seed)
    return learner, LearnerWorker(learner, learner_config)


def _learned_drafter(config: LearnerConfig, specs: list[str], llm: LLM) -> EagleDrafter:
    drafters = list(llm.drafters.values())
    if config.drafter is not None:
        chosen = drafters[specs.index(config.drafter)]
        if not isinstance(chosen, EagleDrafter):
            raise ValueError(f"learner.drafter: {config.drafter!r} is not an EAGLE head (the online learner "
                             f"trains EAGLE heads)")
        return chosen
    for drafter in drafters:
        if isinstance(drafter, EagleDrafter):
            return drafter
    raise ValueError(f"learner.mode: {config.mode!r} needs an EAGLE head among rollout.drafters {specs}")


def skipped_rows_filter(config: LearnerConfig, rewards: list[float]) -> Callable[[list[int]], list[int]]:
    """Of the rows the update skips, those whose learner weight can be non-zero."""
    if config.weighting == "positive_advantage":  # skipped rows have advantage 0: weight 0
        return lambda rows: []
    if config.weighting == "reward":
        return lambda rows: [r for r in rows if rewards[r] > 0]
    return lambda rows: list(rows)
