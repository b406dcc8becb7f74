"""``RolloutWorker``: one Ray actor that owns an ``LLM`` (its drafters and its own adaptive controller).

The actor is threaded: ``generate`` runs in one thread while ``update_drafter`` (and the pool's
health calls) run in others. A drafter snapshot goes into the drafter's mailbox and the engine swaps
it in between two decode steps, even in the middle of a ``generate`` call; one whose digest does not
match its content, or whose version is not the one announced, is refused. ``update_weights`` waits
for a running ``generate`` to finish: a rollout samples from one actor version.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from dataclasses import dataclass, replace

import torch

from ..engine.llm import LLM, RequestOutput
from ..engine.params import SamplingParams
from ..engine.snapshots import DrafterSnapshot, Mailbox
from ..engine.stats import GenerationStats
from .weights import PackedWeights, load_packed


@dataclass
class WorkerSpec:
    """What every worker builds: ``LLM(model, device=..., drafter=drafters, speculative=...)``."""

    model: str
    device: str | None = None
    dtype: str | None = None
    max_num_seqs: int = 64
    drafters: list[str] | None = None
    speculative: object = None
    weights_version: int = 0  # the actor version the model file holds


@dataclass
class WorkResult:
    item: int
    outputs: list[RequestOutput]
    weights_version: int
    seconds: float  # inside generate
    tokens: int
    stats: GenerationStats  # the worker's cumulative counters after this item (no decision trace)
    worker: int = -1


class RolloutWorker:
    def __init__(self, spec: WorkerSpec, index: int, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, int(num_threads)))
        self.index = index
        self.llm = LLM(spec.model, device=spec.device, dtype=spec.dtype, max_num_seqs=spec.max_num_seqs,
                       drafter=spec.drafters, speculative=spec.speculative)
        self.llm.model.requires_grad_(False)
        self.weights_version = spec.weights_version
        self.mailboxes: dict[str, Mailbox] = {}
        for name, drafter in self.llm.drafters.items():
            if drafter.learnable() is not None:
                self.mailboxes[name] = Mailbox()
                drafter.subscribe(self.mailboxes[name])
        self._lock = threading.Lock()  # generate vs update_weights
        self.busy_s = 0.0
        self.born = time.time()
        self.refused: list[str] = []

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "index": self.index,
                "node": ray.get_runtime_context().get_node_id()}

    def generate(self, item: int, prompts: list[list[int]], params: list[SamplingParams]) -> WorkResult:
        with self._lock:
            start = time.perf_counter()
            before = self.llm.stats.generated_tokens
            outputs = self.llm.generate(prompts, params, progress=False)
            seconds = time.perf_counter() - start
            self.busy_s += seconds
            return WorkResult(item, outputs, self.weights_version, seconds,
                              self.llm.stats.generated_tokens - before, self.stats(), self.index)

    def progress(self) -> int:
        """Tokens generated so far (read while ``generate`` runs)."""
        return self.llm.stats.generated_tokens

    def stats(self) -> GenerationStats:
        stats = self.llm.stats
        return replace(stats, spec=copy.deepcopy(stats.spec), arm_steps=dict(stats.arm_steps), trace=[])

    def update_weights(self, version: int, packed: PackedWeights) -> float:
        """Load the actor's weights of ``version``; returns the seconds spent (waiting excluded)."""
        if packed.version != version:
            raise ValueError(f"weights: announced v{version}, the object holds v{packed.version}")
        with self._lock:
            start = time.perf_counter()
            load_packed(self.llm.model, packed)
            self.weights_version = version
            return time.perf_counter() - start

    def update_drafter(self, name: str, version: int, snapshot: DrafterSnapshot) -> bool:
        """Publish ``snapshot`` to drafter ``name``; it enters between two decode steps. A snapshot
        whose version or digest does not match is refused (False) and the drafter keeps its weights."""
        if name not in self.mailboxes:
            raise ValueError(f"drafter {name!r}: this worker has no learnable drafter of that name "
                             f"(it has {sorted(self.mailboxes)})")
        if snapshot.version != version or not snapshot.verify():
            self.refused.append(f"{name} v{version}")
            return False
        try:
            self.mailboxes[name].publish(snapshot)
        except ValueError:  # a newer one arrived first: this one is already superseded
            pass
        return True

    def versions(self) -> dict:
        """The actor version loaded and, per learnable drafter, the version in use and the newest received."""
        return {"weights": self.weights_version,
                "drafters": {name: {"in_use": self.llm.drafters[name].version, "received": box.version}
                             for name, box in self.mailboxes.items()},
                "refused": list(self.refused)}
