"""A GRPO run's rollouts on Ray workers (``distributed.rollout_workers=N``): the trainer's side.

The trainer keeps the actor (it trains it) and the online learner; the workers sample. After each
update the actor's weights go to every worker through the object store as version = steps done; the
learner's published drafter snapshots are forwarded to the workers as soon as they appear, mid-rollout
included. Each sample records the drafter versions it was drafted with.
"""

from __future__ import annotations

from ..distributed.cluster import Connection
from ..distributed.pool import RolloutPool
from ..distributed.worker import WorkerSpec
from ..engine.llm import LLM, RequestOutput
from ..engine.params import SamplingParams
from ..engine.snapshots import make_snapshot
from ..learner.online import OnlineLearner
from .config import TrainConfig


def connect(config: TrainConfig) -> Connection | None:
    """Join (or start) Ray before the model loads, so a bad address or size fails at once."""
    return Connection(config.distributed) if config.distributed.enabled else None


class RemoteRollout:
    def __init__(self, config: TrainConfig, connection: Connection, llm: LLM, learner: OnlineLearner | None,
                 step: int) -> None:
        r = config.rollout
        spec = WorkerSpec(config.model, device=config.device, dtype=config.dtype, max_num_seqs=r.max_num_seqs,
                          drafters=list(r.drafters) if r.speculative != "off" else None,
                          speculative=r.engine_speculative(seed=config.seed))
        self.connection, self.learner = connection, learner
        self.pool = RolloutPool(spec, config.distributed)
        self.sync: dict[str, float] = {}
        self.drafter_name = None
        if learner is not None:
            self.drafter_name = next(n for n, d in llm.drafters.items() if d is learner.drafter)
            if learner.drafter.version > 0:  # a resumed run: the drafter it learned so far
                self.pool.publish_drafter(self.drafter_name, make_snapshot(
                    learner.drafter.learnable(), learner.drafter.version, dtype=learner.publish_dtype))
        if step > 0:  # a resumed run: the workers loaded the initial weights
            self.sync = self.pool.update_weights(llm.model, step)

    @property
    def stats(self):
        return self.pool.stats

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        sources = {self.drafter_name: self.learner.mailbox} if self.learner is not None else None
        outputs = self.pool.generate(prompts, params, sources=sources)
        if self.learner is not None:  # the trainer's copy follows, for its drafter/version figures
            self.learner.drafter.swap_if_newer()
        return outputs

    def drafted_by(self, outputs: list[RequestOutput]) -> int | None:
        """The learned drafter's version if every sample was drafted by that one version, else None."""
        versions = {v for o in outputs for s in o.samples for v in s.drafter_versions.get(self.drafter_name, [])}
        return versions.pop() if len(versions) == 1 else None

    def after_update(self, actor, step: int) -> float:
        """Send the updated actor (version ``step``) to every worker; returns the seconds it took."""
        self.sync = self.pool.update_weights(actor, step)
        return self.sync["sync_s"]

    def metrics(self) -> dict[str, float]:
        out = dict(self.pool.worker_metrics())
        if self.sync:
            out["dist/weight_sync_s"] = self.sync["sync_s"]
            out["dist/weight_sync_mb"] = self.sync["bytes"] / 1e6
        if self.drafter_name is not None:
            published = self.pool.drafters.get(self.drafter_name, (self.learner.drafter.version, None))[0]
            for index, versions in self.pool.versions().items():
                in_use = versions["drafters"].get(self.drafter_name, {}).get("in_use", 0)
                out[f"dist/worker{index}/drafter_lag"] = float(published - in_use)
        out["dist/events"] = float(len(self.pool.events))
        return out

    def close(self) -> None:
        self.pool.close()
        self.connection.close()
