"""Rollouts on Ray workers: equal to one process, drafters mid-rollout, a killed worker, a failing learner.

One local Ray instance and one two-worker pool serve the module (starting workers costs seconds).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray workers start in seconds each: part of make test, not of test-fast

from respec import LLM  # noqa: E402
from respec.distributed.cluster import Connection  # noqa: E402
from respec.distributed.config import DistributedConfig  # noqa: E402
from respec.distributed.learner_actor import RemoteLearner  # noqa: E402
from respec.distributed.pool import RolloutPool  # noqa: E402
from respec.distributed.worker import WorkerSpec  # noqa: E402
from respec.engine.params import SamplingParams  # noqa: E402
from respec.engine.snapshots import DrafterSnapshot, make_snapshot  # noqa: E402
from respec.learner.buffer import Sample  # noqa: E402
from respec.learner.config import LearnerConfig  # noqa: E402
from respec.models.eagle_format import save_eagle_head  # noqa: E402
from tests.helpers import random_head  # noqa: E402

PROMPTS = [[1, 5 + i, 7, 9 + i % 3] for i in range(8)]


def params(tokens: int = 24) -> list[SamplingParams]:
    return [SamplingParams(n=4, temperature=1.0, max_new_tokens=tokens, seed=100 + i) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=300 * 1024 ** 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray, tiny_llama):
    config = DistributedConfig(rollout_workers=2, worker_start_timeout_s=120).validate()
    # Each worker's own adaptive controller picks arms by its own batch; n-gram drafts are verified
    # by coupling with plain decoding, so the samples are the same token for token wherever they run.
    pool = RolloutPool(WorkerSpec(str(tiny_llama), device="cpu", drafters=["ngram"], speculative="adaptive"), config)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def head_dir(tiny_llama, tmp_path_factory):
    model = LLM(str(tiny_llama), device="cpu").model
    return save_eagle_head(random_head(model, seed=5, scale=0.1), tmp_path_factory.mktemp("head") / "eagle", model)


def same_samples(a, b, tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.prompt_token_ids == y.prompt_token_ids
        for s, t in zip(x.samples, y.samples):
            assert s.token_ids == t.token_ids
            assert max((abs(p - q) for p, q in zip(s.logprobs, t.logprobs)), default=0.0) < tol


def test_a_distributed_rollout_equals_the_single_process_one(pool, tiny_llama):
    local = LLM(str(tiny_llama), device="cpu", drafter=["ngram"], speculative="adaptive")
    expected = local.generate(PROMPTS, params(), progress=False)
    got = pool.generate(PROMPTS, params())
    same_samples(got, expected)
    assert pool.generate(PROMPTS, params(), schedule="static") and pool.size == 2
    metrics = pool.worker_metrics()
    assert metrics["dist/workers"] == 2 and metrics["dist/worker0/items"] + metrics["dist/worker1/items"] == 2
    assert pool.stats.generated_tokens > 0


def test_weights_travel_once_and_every_worker_samples_from_them(pool, tiny_llama):
    local = LLM(str(tiny_llama), device="cpu", drafter=["ngram"], speculative="adaptive")
    with torch.no_grad():
        for p in local.model.parameters():
            p.mul_(1.05)
    sync = pool.update_weights(local.model, 1)
    assert sync["bytes"] == sum(p.numel() * 4 for p in local.model.parameters())  # untied: each tensor once
    assert {v["weights"] for v in pool.versions().values()} == {1}
    same_samples(pool.generate(PROMPTS, params()), local.generate(PROMPTS, params(), progress=False))


def test_a_worker_killed_mid_generate_loses_nothing(pool, tiny_llama):
    expected = pool.generate(PROMPTS, params(48))
    victim = next(iter(pool.live.values()))
    pid = victim.info["pid"]

    def kill_when_busy() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if ray.get(victim.handle.progress.remote(), timeout=5) > 0 and victim.item is not None:
                    break
            except Exception:  # noqa: BLE001
                break
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    before = pool.stats.generated_tokens
    killer.start()
    got = pool.generate(PROMPTS, params(48))
    killer.join()
    same_samples(got, expected)
    assert any("lost" in e for e in pool.events) and any("replacement" in e for e in pool.events)
    assert pool.stats.generated_tokens > before
    assert pool.wait_ready() == 2 and victim.index not in pool.live  # the replacement joined
    same_samples(pool.generate(PROMPTS, params(48)), expected)


def test_a_drafter_published_mid_rollout_reaches_every_worker(local_ray, tiny_llama, head_dir):
    config = DistributedConfig(rollout_workers=2, worker_start_timeout_s=120).validate()
    eagle = RolloutPool(WorkerSpec(str(tiny_llama), device="cpu", drafters=[str(head_dir)], speculative=2), config)
    try:
        name = next(iter(next(iter(eagle.versions().values()))["drafters"]))
        model = LLM(str(tiny_llama), device="cpu").model
        newer = random_head(model, seed=6, scale=0.1)
        snapshot = make_snapshot(newer, 1)

        class Later:  # a source that publishes once every worker has decoded (the rollout is under way)
            published = False

            @property
            def version(self) -> int:
                if not self.published:
                    self.published = all(ray.get(s.handle.progress.remote()) > started[s.index]
                                         for s in eagle.live.values())
                return int(self.published)

            def latest(self):
                return snapshot

        started = {s.index: ray.get(s.handle.progress.remote()) for s in eagle.live.values()}
        long = [SamplingParams(n=4, temperature=1.0, max_new_tokens=200, ignore_eos=True, seed=100 + i)
                for i in range(len(PROMPTS))]  # every row still decoding when the new head arrives
        source = Later()
        outputs = eagle.generate(PROMPTS, long, sources={name: source})
        seen = [s.drafter_versions[name] for o in outputs for s in o.samples]
        assert all(v == sorted(v) and set(v) <= {0, 1} for v in seen)
        assert any(1 in v for v in seen)
        assert all(v["drafters"][name]["received"] == 1 for v in eagle.versions().values())
        outputs = eagle.generate(PROMPTS[:2], params()[:2])
        assert all(s.drafter_versions[name] == [1] for o in outputs for s in o.samples)
        bad = DrafterSnapshot(2, {k: v + 1 for k, v in snapshot.tensors.items()}, snapshot.digest)  # digest of other content
        refused = [ray.get(s.handle.update_drafter.remote(name, 2, bad)) for s in eagle.live.values()]
        assert refused == [False, False]
        assert all(v["drafters"][name]["received"] == 1 and v["refused"] for v in eagle.versions().values())
    finally:
        eagle.close()


def test_a_failing_learner_actor_is_isolated_and_reported(pool, tiny_llama, head_dir):
    from respec.engine.drafters import make_drafters

    local = LLM(str(tiny_llama), device="cpu")
    drafter = next(iter(make_drafters([str(head_dir)], local.model, local.tokenizer).values()))
    config = LearnerConfig(mode="async", min_buffer_tokens=1, batch_size=2)
    learner = RemoteLearner(drafter, config, depths=2, temperature=1.0, seed=0)
    try:
        width = drafter.head.fc.weight.shape[1] + 1  # features of the wrong width: the round raises
        broken = Sample(tokens=torch.arange(8), prompt_len=3, features=torch.zeros(8, width, dtype=torch.bfloat16),
                        target=torch.zeros(4, local.model.config.vocab_size, dtype=torch.bfloat16),
                        target_index=None, reward=1.0, advantage=1.0, step=0)
        assert learner.get(learner.call("add_samples", ray.put([broken]))) == 8  # in the buffer before the round
        learner.after_update(local.model, 0, None)
        learner.wait_idle(timeout=60)
        with pytest.warns(RuntimeWarning, match="learner actor failed"):
            metrics = learner.metrics(1)
        assert metrics["drafter/error"] == 1.0 and learner.error
        assert learner.metrics(2)["drafter/error"] == 1.0  # no more calls, still reported
        assert pool.generate(PROMPTS[:2], params()[:2])  # rollouts go on
    finally:
        learner.close()


@pytest.mark.parametrize("override, field", [
    ({"rollout_workers": 0}, "distributed.rollout_workers"),
    ({"address": "nowhere"}, "distributed.address"),
    ({"num_cpus": 0}, "distributed.num_cpus"),
])
def test_bad_settings_are_refused_by_name(override, field):
    with pytest.raises(ValueError, match=field):
        DistributedConfig(**{"rollout_workers": 1, **override}).validate()


def test_an_unreachable_address_fails_at_once():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="distributed.address"):
        Connection(DistributedConfig(rollout_workers=1, address="127.0.0.1:9").validate())
    assert time.perf_counter() - started < 10


def test_more_gpus_per_worker_than_the_cluster_has_fails_at_once(local_ray):
    with pytest.raises(ValueError, match="distributed.num_gpus"):
        Connection(DistributedConfig(rollout_workers=1, num_gpus=1).validate())


def test_a_training_run_on_two_workers_equals_the_single_process_run(local_ray, tiny_llama, tmp_path):
    from respec.rl.metrics import read_metrics
    from respec.rl.trainer import Trainer
    from tests.helpers import char_class_reward, tiny_config

    runs = {}
    for name, extra in (("one", []), ("two", ["distributed.rollout_workers=2"])):
        config = tiny_config(tiny_llama, tmp_path / name, "rollout.speculative=adaptive", "rollout.drafters=[ngram]",
                             *extra)
        Trainer(config, reward_fn=char_class_reward).train(progress=False)
        runs[name] = read_metrics(tmp_path / name)
    for one, two in zip(runs["one"], runs["two"]):
        for key in ("train/reward", "train/kl", "train/loss", "train/response_length"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
        assert two["train/logprob_diff_max"] < 1e-4
        assert two["dist/workers"] == 2 and two["dist/weight_sync_mb"] > 0
        assert two["dist/worker0/items"] + two["dist/worker1/items"] >= 2
    from respec.rl.report import make_report

    summary = (make_report(tmp_path / "two") / "summary.md").read_text()
    assert "## Rollout workers" in summary and "| worker1 |" in summary
