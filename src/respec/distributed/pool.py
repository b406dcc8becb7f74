"""``RolloutPool``: N rollout workers that pull prompt groups from one queue and survive losing some.

A rollout is split into work items of whole prompt groups (all ``n`` samples of a prompt go to one
worker, so one prefill serves them and sibling n-gram drafts keep working). Each worker holds one
item at a time and gets the next as soon as it returns one, so a worker whose items finish early
takes more of them (the long tail); ``schedule="static"`` instead cuts the rollout into one shard per
worker, for comparison. Results come back in request order, and each request carries its own seed,
so they do not depend on which worker served it or with whom it was batched.

A worker that dies mid-item (its process killed, its node lost) has the item put back at the head of
the queue; a replacement starts where the cluster has room (it loads the current weights and
drafters before taking work), otherwise the pool goes on smaller. ``rescale`` (each step) starts
workers up to ``rollout_workers`` when room has appeared, e.g. a node joined.

Weights travel through the object store once per version (``ray.put`` once; every worker reads that
object); drafter snapshots likewise, announced to every worker as soon as the source publishes them,
mid-rollout included.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..engine.llm import RequestOutput
from ..engine.params import SamplingParams
from ..engine.snapshots import DrafterSnapshot
from ..engine.stats import GenerationStats
from .cluster import free_slots, require_ray
from .config import DistributedConfig
from .stats import merge_stats
from .weights import pack_weights
from .worker import RolloutWorker, WorkerSpec, WorkResult

REPLACE_WAIT_S = 5.0  # how long a lost worker's resources may take to come back before the pool shrinks


@dataclass
class WorkerState:
    index: int
    handle: object
    info: dict = field(default_factory=dict)
    item: tuple | None = None  # (ref, item id, dispatched at)
    busy_s: float = 0.0  # generate seconds, this rollout
    dispatch_s: float = 0.0  # driver-seen item seconds minus generate seconds (transfer, scheduling)
    items: int = 0
    tokens: int = 0
    started_at: float = 0.0


class RolloutPool:
    def __init__(self, spec: WorkerSpec, config: DistributedConfig) -> None:
        self.ray = require_ray()
        self.spec, self.config = spec, config
        self._actor = self.ray.remote(RolloutWorker)
        self.live: dict[int, WorkerState] = {}
        self.starting: dict[object, WorkerState] = {}  # ready ref -> worker
        self._next_index = 0
        self.weights: tuple[int, object] | None = None  # (version, object ref) the workers hold
        self.drafters: dict[str, tuple[int, object]] = {}
        self._stats: dict[int, GenerationStats] = {}  # last cumulative counters per worker, dead ones kept
        self.events: list[str] = []  # deaths, replacements, shrinking and growing, for the run's log
        self._next_item = 0
        self._lost_at: float | None = None  # when a worker was lost that no replacement has taken over yet
        self.last: dict[str, float] = {}
        room, deadline = free_slots(config), time.perf_counter() + 10.0
        while room < config.rollout_workers and time.perf_counter() < deadline:  # resources of actors
            time.sleep(0.5)                                                      # just ended come back late
            room = free_slots(config)
        if room < 1:
            raise ValueError(f"distributed.num_cpus: the cluster has no room for one worker of {config.num_cpus:g} "
                             f"CPUs and {config.num_gpus:g} GPUs now (free: {self.ray.available_resources()})")
        if room < config.rollout_workers:
            self.events.append(f"the cluster holds {room} of the {config.rollout_workers} workers asked: "
                               f"starting {room} (more start when room appears)")
        for _ in range(min(room, config.rollout_workers)):
            self._start_worker()
        self._wait_started(config.worker_start_timeout_s)
        if not self.live:
            raise RuntimeError("distributed: no rollout worker started (see the Ray logs)")

    # ------------------------------------------------------------------ membership
    def _start_worker(self) -> None:
        options = {"num_cpus": self.config.num_cpus, "num_gpus": self.config.num_gpus, "max_concurrency": 4,
                   "max_restarts": 0, "max_task_retries": 0}
        index, self._next_index = self._next_index, self._next_index + 1
        handle = self._actor.options(**options).remote(self.spec, index, max(1, int(self.config.num_cpus)))
        state = WorkerState(index, handle, started_at=time.perf_counter())
        self.starting[handle.ready.remote()] = state

    def wait_ready(self, timeout: float | None = None) -> int:
        """Wait for the workers still starting (e.g. replacements); returns the pool's size."""
        self._wait_started(self.config.worker_start_timeout_s if timeout is None else timeout)
        return len(self.live)

    def _wait_started(self, timeout: float) -> None:
        if self.starting:
            self.ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        self._admit_started(timeout)

    def _admit_started(self, timeout: float) -> None:
        """Workers whose start finished join (after loading the current weights and drafters); those
        that died starting, or waited past ``timeout`` for room, are dropped."""
        for ref, state in list(self.starting.items()):
            done, _ = self.ray.wait([ref], timeout=0)
            if not done:
                if time.perf_counter() - state.started_at > timeout:
                    self.ray.kill(state.handle)
                    del self.starting[ref]
                    self.events.append(f"worker {state.index} did not start within {timeout:g} s: dropped")
                continue
            del self.starting[ref]
            try:
                state.info = self.ray.get(ref)
                self._sync_new(state)
            except self._lost_errors() as err:
                self.events.append(f"worker {state.index} died while starting: {type(err).__name__}")
                continue
            self.live[state.index] = state

    def _sync_new(self, state: WorkerState) -> None:
        calls = []
        if self.weights is not None and self.weights[0] != self.spec.weights_version:
            calls.append(state.handle.update_weights.remote(*self.weights))
        for name, (version, ref) in self.drafters.items():
            calls.append(state.handle.update_drafter.remote(name, version, ref))
        self.ray.get(calls)

    def _lost_errors(self) -> tuple[type, ...]:
        exc = self.ray.exceptions
        return tuple(getattr(exc, n) for n in ("RayActorError", "WorkerCrashedError", "ObjectLostError",
                                               "NodeDiedError", "OwnerDiedError") if hasattr(exc, n))

    def _lose(self, state: WorkerState, err: BaseException) -> None:
        self.live.pop(state.index, None)
        self.events.append(f"worker {state.index} lost ({type(err).__name__}); its item goes back to the queue")
        self._lost_at = time.perf_counter()
        self._replace_lost()

    def _replace_lost(self) -> None:
        """Start a replacement where the cluster has room; a lost worker's resources come back after a
        moment, so the pool looks again for a few seconds before it goes on smaller."""
        if free_slots(self.config) >= 1:
            self._start_worker()
            self.events.append("a replacement worker is starting")
            self._lost_at = None
        elif self._lost_at is not None and time.perf_counter() - self._lost_at > REPLACE_WAIT_S:
            self.events.append(f"no room for a replacement: the pool goes on with {len(self.live)} worker(s)")
            self._lost_at = None

    def rescale(self) -> None:
        """Start workers up to ``rollout_workers`` where the cluster has room (a node joined)."""
        self._admit_started(self.config.worker_start_timeout_s)
        missing = self.config.rollout_workers - len(self.live) - len(self.starting)
        for _ in range(min(missing, free_slots(self.config))):
            self._start_worker()
            self.events.append("room appeared: a worker is starting")

    @property
    def size(self) -> int:
        return len(self.live)

    def worker_info(self) -> dict[int, dict]:
        return {index: dict(state.info) for index, state in self.live.items()}

    # ------------------------------------------------------------------ weights and drafters
    def update_weights(self, module: torch.nn.Module, version: int) -> dict[str, float]:
        """The actor's weights of ``version`` to every worker: one ``ray.put``, one object all read."""
        start = time.perf_counter()
        packed = pack_weights(module, version)
        ref = self.ray.put(packed)
        put_s = time.perf_counter() - start
        self.weights = (version, ref)
        states = list(self.live.values())
        calls = [s.handle.update_weights.remote(version, ref) for s in states]
        load_s = []
        for state, call in zip(states, calls):
            try:
                load_s.append(self.ray.get(call))
            except self._lost_errors() as err:  # it will be replaced with these weights
                self._lose(state, err)
        return {"sync_s": time.perf_counter() - start, "put_s": put_s, "bytes": float(packed.nbytes),
                "load_s": max(load_s, default=0.0)}

    def publish_drafter(self, name: str, snapshot: DrafterSnapshot) -> None:
        """Hand a drafter snapshot to every worker and wait until each holds it (a running rollout
        takes it at its next decode step, the next rollout from its first)."""
        if name in self.drafters and self.drafters[name][0] >= snapshot.version:
            return
        ref = self.ray.put(snapshot)
        self.drafters[name] = (snapshot.version, ref)
        states = list(self.live.values())
        calls = [state.handle.update_drafter.remote(name, snapshot.version, ref) for state in states]
        for state, call in zip(states, calls):
            try:
                self.ray.get(call)
            except self._lost_errors() as err:  # its item comes back through _collect; replaced there
                self.events.append(f"worker {state.index} lost while taking drafter v{snapshot.version} "
                                   f"({type(err).__name__})")

    def _poll_sources(self, sources: dict) -> None:
        for name, source in sources.items():
            if source.version > self.drafters.get(name, (0, None))[0]:
                snapshot = source.latest()
                if snapshot is not None:
                    self.publish_drafter(name, snapshot)

    def versions(self) -> dict[int, dict]:
        refs = {index: s.handle.versions.remote() for index, s in self.live.items()}
        out = {}
        for index, ref in refs.items():
            try:
                out[index] = self.ray.get(ref)
            except self._lost_errors():
                continue
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], params: list[SamplingParams], *, sources: dict | None = None,
                 schedule: str = "queue") -> list[RequestOutput]:
        """One output per prompt, in request order; ``sources``: drafter name -> a mailbox-like source
        (``.version``, ``.latest()``) polled while the rollout runs."""
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        self.rescale()
        if not self.live and not self.starting:
            raise RuntimeError("distributed: no rollout worker left and no room to start one")
        queue = deque(self._pieces(len(prompts), schedule))
        for state in self.live.values():
            state.busy_s = state.dispatch_s = 0.0
            state.items = state.tokens = 0
        results: dict[int, RequestOutput] = {}
        start = time.perf_counter()
        while queue or any(s.item is not None for s in self.live.values()):
            self._poll_sources(sources or {})
            self._admit_started(self.config.worker_start_timeout_s)
            self._dispatch(queue, prompts, params, whole=schedule == "static")
            self._collect(queue, results)
            if queue and not self.live and not self.starting:
                raise RuntimeError(f"distributed: every rollout worker was lost with {sum(map(len, queue))} "
                                   f"prompt group(s) left and no room to start another")
            if len(self.live) + len(self.starting) < self.config.rollout_workers:
                self._replace_lost()
        self._poll_sources(sources or {})
        self.last = {"wall_s": time.perf_counter() - start}
        return [results[row] for row in range(len(prompts))]

    def _pieces(self, count: int, schedule: str) -> list[list[int]]:
        """The queue's content: one piece of every prompt group in request order, or static shards."""
        if schedule == "static":
            shards = max(1, len(self.live))
            bounds = [round(i * count / shards) for i in range(shards + 1)]
            return [list(range(bounds[i], bounds[i + 1])) for i in range(shards) if bounds[i] < bounds[i + 1]]
        if schedule != "queue":
            raise ValueError(f"schedule: must be 'queue' or 'static', got {schedule!r}")
        return [list(range(count))]

    def _item_size(self, left: int) -> int:
        """Guided self-scheduling: each worker's share of what is left, so the first items are large
        (decoding is cheapest per token in large batches) and later ones shrink (they balance the tail)."""
        if self.config.groups_per_item:
            return self.config.groups_per_item
        return max(1, -(-left // max(len(self.live), 1)))

    def _dispatch(self, queue: deque, prompts: list, params: list, whole: bool = False) -> None:
        for state in self.live.values():
            if state.item is not None or not queue:
                continue
            piece = queue.popleft()
            size = len(piece) if whole else self._item_size(len(piece) + sum(map(len, queue)))
            rows, rest = piece[:size], piece[size:]
            if rest:
                queue.appendleft(rest)
            self._next_item += 1
            ref = state.handle.generate.remote(self._next_item, [prompts[r] for r in rows], [params[r] for r in rows])
            state.item = (ref, rows, time.perf_counter())

    def _collect(self, queue: deque, results: dict[int, RequestOutput]) -> None:
        running = {s.item[0]: s for s in self.live.values() if s.item is not None}
        waiting = list(running) + list(self.starting)
        if not waiting:
            return
        done, _ = self.ray.wait(waiting, num_returns=1, timeout=0.2)
        for ref in done:
            state = running.get(ref)
            if state is None:
                continue  # a worker finished starting: admitted on the next pass
            _, rows, sent = state.item
            state.item = None
            try:
                result: WorkResult = self.ray.get(ref)
            except self._lost_errors() as err:
                queue.appendleft(rows)
                self._lose(state, err)
                continue
            results.update(zip(rows, result.outputs))
            self._stats[state.index] = result.stats
            state.busy_s += result.seconds
            state.dispatch_s += max(0.0, time.perf_counter() - sent - result.seconds)
            state.items += 1
            state.tokens += result.tokens

    # ------------------------------------------------------------------ figures
    @property
    def stats(self) -> GenerationStats:
        """Cumulative counters over every worker (those lost keep what they returned)."""
        return merge_stats(list(self._stats.values()))

    def worker_metrics(self) -> dict[str, float]:
        """Per worker, for the rollout just done: tokens/s while busy, busy and idle seconds, dispatch
        overhead, items; with the pool's size."""
        wall = self.last.get("wall_s", 0.0)
        out = {"dist/workers": float(len(self.live))}
        for index, s in sorted(self.live.items()):
            prefix = f"dist/worker{index}"
            out[f"{prefix}/tokens_per_s"] = s.tokens / s.busy_s if s.busy_s else 0.0
            out[f"{prefix}/busy_s"] = s.busy_s
            out[f"{prefix}/idle_s"] = max(0.0, wall - s.busy_s)
            out[f"{prefix}/dispatch_s"] = s.dispatch_s
            out[f"{prefix}/items"] = float(s.items)
        return out

    def close(self) -> None:
        """Stop every worker and wait until they are gone (their resources free again)."""
        states = list(self.live.values()) + list(self.starting.values())
        for state in states:
            try:
                self.ray.kill(state.handle)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        for state in states:
            try:
                self.ray.get(state.handle.ready.remote(), timeout=10)
            except Exception:  # noqa: BLE001 -- the expected end: the actor died
                pass
        self.live.clear()
        self.starting.clear()
