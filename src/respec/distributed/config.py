"""Where rollouts run: one process (the default) or a pool of Ray actors, and what each worker gets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..utils.configs import require

_HOST_PORT = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


@dataclass
class DistributedConfig:
    # None: rollouts run in the trainer's own process (no Ray). N >= 1: N Ray rollout workers.
    rollout_workers: int | None = None
    # "local": start a Ray instance for this run and stop it at the end; "auto": join the cluster this
    # machine is part of (`ray start --head` ran here); "ray://host:port" (Ray client) or "host:port".
    address: str = "local"
    num_cpus: float = 1.0  # per rollout worker (also its torch thread count)
    num_gpus: float = 0.0  # per rollout worker
    # Prompt groups per work item a worker pulls (0: guided, each worker's share of what is left:
    # large items first for large batches, shrinking ones to balance the long tail).
    groups_per_item: int = 0
    learner_actor: bool = True  # an async/triggered online learner runs as its own Ray actor
    # Seconds a new worker may take to start (load its model) before the pool gives up on it.
    worker_start_timeout_s: float = 300.0

    @property
    def enabled(self) -> bool:
        return self.rollout_workers is not None

    def validate(self, prefix: str = "distributed") -> DistributedConfig:
        if self.rollout_workers is not None:
            require(isinstance(self.rollout_workers, int) and not isinstance(self.rollout_workers, bool)
                    and self.rollout_workers >= 1, f"{prefix}.rollout_workers",
                    f"must be an integer >= 1 (or null: no Ray), got {self.rollout_workers!r}")
        require(isinstance(self.address, str) and (self.address in ("local", "auto") or bool(_HOST_PORT.match(self.address))),
                f"{prefix}.address", f"must be 'local', 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {self.address!r}")
        require(self.num_cpus > 0, f"{prefix}.num_cpus", f"must be > 0, got {self.num_cpus}")
        require(self.num_gpus >= 0, f"{prefix}.num_gpus", f"must be >= 0, got {self.num_gpus}")
        require(self.groups_per_item >= 0, f"{prefix}.groups_per_item", f"must be >= 0, got {self.groups_per_item}")
        require(self.worker_start_timeout_s > 0, f"{prefix}.worker_start_timeout_s",
                f"must be > 0, got {self.worker_start_timeout_s}")
        return self
