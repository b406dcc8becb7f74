"""A two-node cluster simulated on this machine: a node lost mid-step loses nothing; a node added grows the pool."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray workers start in seconds each: part of make test, not of test-fast

from ray.cluster_utils import Cluster  # noqa: E402

from respec.distributed.config import DistributedConfig  # noqa: E402
from respec.distributed.pool import RolloutPool  # noqa: E402
from respec.distributed.worker import WorkerSpec  # noqa: E402
from tests.distributed.test_pool import PROMPTS, params, same_samples  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 1024 ** 2})
    cluster.add_node(num_cpus=1, object_store_memory=200 * 1024 ** 2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_node_lost_mid_step_shrinks_the_pool_and_a_node_added_grows_it(cluster, tiny_llama):
    config = DistributedConfig(rollout_workers=2, worker_start_timeout_s=120).validate()
    pool = RolloutPool(WorkerSpec(str(tiny_llama), device="cpu", drafters=["ngram"], speculative="adaptive"), config)
    try:
        assert pool.size == 2 and len({w["node"] for w in pool.worker_info().values()}) == 2  # one per node
        expected = pool.generate(PROMPTS, params(48))
        head_node = ray.get_runtime_context().get_node_id()
        doomed = next(n for n in cluster.list_all_nodes() if n.node_id != head_node)
        on_doomed = next(s for s in pool.live.values() if s.info["node"] == doomed.node_id)

        def remove_when_busy() -> None:
            deadline = time.time() + 60
            while time.time() < deadline and on_doomed.item is None:
                time.sleep(0.01)
            cluster.remove_node(doomed)

        remover = threading.Thread(target=remove_when_busy)
        remover.start()
        got = pool.generate(PROMPTS, params(48))
        remover.join()
        same_samples(got, expected)
        assert pool.size == 1 and not pool.starting and any("lost" in e for e in pool.events)

        cluster.add_node(num_cpus=1, object_store_memory=200 * 1024 ** 2)
        cluster.wait_for_nodes()
        deadline = time.time() + 30
        while time.time() < deadline and pool.size + len(pool.starting) < 2:
            pool.rescale()
            time.sleep(0.5)
        assert pool.wait_ready() == 2
        same_samples(pool.generate(PROMPTS, params(48)), expected)
    finally:
        pool.close()
