"""Joining Ray: a local instance this run starts and stops, or an existing cluster; checked at once.

``connect`` fails in seconds, naming the field, when the address cannot be reached or when the
cluster cannot hold one worker of the size asked (``num_cpus`` / ``num_gpus`` per worker larger than
any node has): before the model loads, not after a worker waits forever for resources.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket

from .config import DistributedConfig


def require_ray():
    if importlib.util.find_spec("ray") is None:
        raise ValueError("distributed.rollout_workers: needs Ray; install it with pip install 'respec[ray]'")
    import ray

    return ray


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


class Connection:
    """A Ray session for one run: ``close`` stops Ray only if this connection started it."""

    def __init__(self, config: DistributedConfig) -> None:
        ray = require_ray()
        self.config, self.started = config, False
        if config.address not in ("local", "auto") and not _reachable(config.address):
            raise ValueError(f"distributed.address: cannot reach {config.address!r} (nothing answers there; "
                             f"start a head with `ray start --head` or use address=local)")
        if ray.is_initialized():  # a caller (a test, a notebook) already joined a cluster: use it
            pass
        elif config.address == "local":
            # Logical CPUs for every worker and the learner actor even on a small machine (they then
            # share its cores): a local run never waits for resources it will not get.
            wanted = config.num_cpus * ((config.rollout_workers or 1) + int(config.learner_actor))
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)),
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     object_store_memory=_object_store_bytes())
            self.started = True
        else:
            try:
                ray.init(address=config.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ValueError(f"distributed.address: cannot join the Ray cluster at {config.address!r}: "
                                 f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            self.started = False
        try:
            check_fits(config)
        except ValueError:
            self.close()
            raise

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _object_store_bytes() -> int:
    """A modest store for a laptop run: a few copies of a small model's weights, not 30% of memory."""
    return int(os.environ.get("RESPEC_RAY_OBJECT_STORE_BYTES", str(2 * 1024 ** 3)))


def node_capacities() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_fits(config: DistributedConfig) -> None:
    """Refuse a worker size no live node can hold."""
    nodes = node_capacities()
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if config.num_gpus > gpus:
        raise ValueError(f"distributed.num_gpus: {config.num_gpus:g} GPUs per worker, but the largest node of "
                         f"the cluster has {gpus:g}")
    if config.num_cpus > cpus:
        raise ValueError(f"distributed.num_cpus: {config.num_cpus:g} CPUs per worker, but the largest node of "
                         f"the cluster has {cpus:g}")


def free_slots(config: DistributedConfig) -> int:
    """How many more workers of this size the cluster's free resources hold now."""
    import ray

    free = ray.available_resources()
    slots = int(free.get("CPU", 0.0) // config.num_cpus + 1e-9)
    if config.num_gpus:
        slots = min(slots, int(free.get("GPU", 0.0) // config.num_gpus + 1e-9))
    return slots
