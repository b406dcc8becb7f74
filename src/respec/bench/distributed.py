"""``respec bench --distributed``: rollouts on Ray workers, measured on this machine, projected to GPUs.

Four figures, each from one run on the same prompts:

* scaling: one rollout (the same prompts and seeds) in this process, on 1 worker (all threads) and on
  2 workers (half each); on a 2-core machine two workers split the same cores, so this shows the
  pool's overhead and parallel efficiency, not a cluster's speed;
* long tail: response lengths drawn long-tailed (EOS ignored, so each length is exact), split as
  static contiguous shards vs pulled from the queue, on the same pool;
* weight sync: seconds and MB to send the actor to every worker (one ``ray.put``, each worker loads
  the same object), for SmolLM2-135M and a random model of Llama-3.2-1B's shape in bf16;
* projection: AR rollout time of the simulated 7B/H100 long-tail rollout split over N GPU workers
  (static shards; per-worker step times from the roofline cost model of ``bench/sim``, which is fitted
  to published figures) plus a weight broadcast at an assumed bandwidth: a model, labelled as such.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..data.tasks import load_questions
from ..distributed.cluster import Connection
from ..distributed.config import DistributedConfig
from ..distributed.pool import RolloutPool
from ..distributed.weights import load_packed, pack_weights
from ..distributed.worker import WorkerSpec
from ..engine.llm import LLM
from ..engine.params import SamplingParams
from ..models.config import ModelConfig
from ..models.decoder import DecoderLM

LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}


def _params(count: int, n: int, tokens: list[int] | int, temperature: float) -> list[SamplingParams]:
    budgets = tokens if isinstance(tokens, list) else [tokens] * count
    return [SamplingParams(n=n, temperature=temperature, max_new_tokens=b, seed=1000 + i, ignore_eos=True)
            for i, b in enumerate(budgets)]


def scaling(model: str, prompts: list[list[int]], n: int, tokens: int, workers: list[int], threads: int) -> list[dict]:
    params = _params(len(prompts), n, tokens, 0.7)
    llm = LLM(model, device="cpu")
    llm.generate(prompts[:2], _params(2, n, 4, 0.7), progress=False)  # warm-up: first-call costs are not timed
    start = time.perf_counter()
    reference = llm.generate(prompts, params, progress=False)
    rows = [{"setup": f"one process, {threads} threads", "workers": 0, "seconds": time.perf_counter() - start}]
    del llm
    for count in workers:
        per = max(1, threads // count)
        config = DistributedConfig(rollout_workers=count, num_cpus=per).validate()
        pool = RolloutPool(WorkerSpec(model, device="cpu"), config)
        try:
            _warm_up(pool, prompts, n)
            start = time.perf_counter()
            outputs = pool.generate(prompts, params)
            seconds = time.perf_counter() - start
            same = all(a.token_ids == b.token_ids for o, r in zip(outputs, reference) for a, b in zip(o.samples, r.samples))
            rows.append({"setup": f"{count} worker(s) x {per} thread(s)", "workers": count, "seconds": seconds,
                         "identical_to_one_process": same, **pool.worker_metrics()})
        finally:
            pool.close()
    tokens_total = len(prompts) * n * tokens
    for row in rows:
        row["tokens_per_s"] = tokens_total / row["seconds"]
        row["vs_one_process"] = rows[0]["seconds"] / row["seconds"]
    return rows


def long_tail(model: str, prompts: list[list[int]], n: int, budgets: list[int], workers: int, threads: int) -> list[dict]:
    params = _params(len(prompts), n, budgets, 0.7)
    per = max(1, threads // workers)
    pool = RolloutPool(WorkerSpec(model, device="cpu"), DistributedConfig(rollout_workers=workers, num_cpus=per).validate())
    rows = []
    try:
        _warm_up(pool, prompts, n)
        for schedule in ("static", "queue", "static", "queue"):  # interleaved twice: the machine drifts
            start = time.perf_counter()
            pool.generate(prompts, params, schedule=schedule)
            metrics = pool.worker_metrics()
            busy = [v for k, v in metrics.items() if k.endswith("/busy_s")]
            rows.append({"schedule": schedule, "seconds": time.perf_counter() - start, "busy_s": busy})
    finally:
        pool.close()
    return rows


def fault(model: str, prompts: list[list[int]], n: int, tokens: int, workers: int, threads: int) -> dict:
    """The same rollout fault-free, then with one worker's process killed half-way through it."""
    import os
    import signal
    import threading

    params = _params(len(prompts), n, tokens, 0.7)
    pool = RolloutPool(WorkerSpec(model, device="cpu"),
                       DistributedConfig(rollout_workers=workers, num_cpus=max(1, threads // workers)).validate())
    try:
        _warm_up(pool, prompts, n)
        start = time.perf_counter()
        clean = pool.generate(prompts, params)
        clean_s = time.perf_counter() - start
        victim = next(iter(pool.live.values()))
        killer = threading.Timer(clean_s / 2, lambda: os.kill(victim.info["pid"], signal.SIGKILL))
        killer.start()
        start = time.perf_counter()
        faulted = pool.generate(prompts, params)
        faulted_s = time.perf_counter() - start
        killer.join()
        same = all(a.token_ids == b.token_ids and a.logprobs == b.logprobs
                   for o, r in zip(faulted, clean) for a, b in zip(o.samples, r.samples))
        samples = sum(len(o.samples) for o in faulted)
        return {"fault_free_s": clean_s, "with_kill_s": faulted_s, "extra_s": faulted_s - clean_s,
                "samples": samples, "expected_samples": len(prompts) * n, "identical": same,
                "events": list(pool.events), "workers_after": pool.wait_ready()}
    finally:
        pool.close()


def _warm_up(pool: RolloutPool, prompts: list[list[int]], n: int) -> None:
    """One short item per worker, so no timed rollout pays a worker's first-call costs."""
    count = max(pool.size, 1)
    pool.generate([prompts[i % len(prompts)] for i in range(count)], _params(count, n, 4, 0.7), schedule="static")


class _Sink:
    """A Ray actor holding a model of a given shape: what a rollout worker does with new weights."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        torch.set_num_threads(1)
        self.model = DecoderLM(config, dtype=dtype)

    def load(self, packed) -> float:
        start = time.perf_counter()
        load_packed(self.model, packed)
        return time.perf_counter() - start


def weight_sync(name: str, model: DecoderLM, workers: int, repeats: int = 3) -> dict:
    import ray

    sinks = [ray.remote(_Sink).options(num_cpus=0.01).remote(model.config, model.dtype) for _ in range(workers)]
    rows = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        packed = pack_weights(model, version)
        ref = ray.put(packed)
        put_s = time.perf_counter() - start
        loads = ray.get([s.load.remote(ref) for s in sinks])
        rows.append({"sync_s": time.perf_counter() - start, "put_s": put_s, "load_s": max(loads, default=0.0),
                     "mb": packed.nbytes / 1e6})
        del ref, packed
    for sink in sinks:
        ray.kill(sink)
    best = min(rows, key=lambda r: r["sync_s"])
    return {"model": name, "workers": workers, "dtype": str(model.dtype), **best,
            "sync_s_all": [r["sync_s"] for r in rows]}


def projection(workers: list[int], bandwidth_gbs: float = 25.0, rows_total: int = 512, seed: int = 0) -> list[dict]:
    """AR rollout seconds of the simulated 7B/H100 long-tail rollout over N GPU workers (static shards
    of whole groups, each worker's steps priced by the roofline model), plus broadcasting the 7B
    weights (bf16) at ``bandwidth_gbs``: a model, not a measurement."""
    from .sim.worlds import named_worlds

    world = next(w for w in named_worlds().values() if "7b" in w.name.lower())
    workload = dataclasses.replace(world.workload, rows=rows_total)
    prompts, budgets = workload.draw(np.random.default_rng(seed))
    costs, prompt_len = world.costs, float(prompts.mean())
    weight_gb = 2.0 * costs.model.forward.params / 1e9
    rows = []
    for count in workers:
        shards = np.array_split(np.arange(len(budgets)), count)  # contiguous, in request order
        times = [_ar_seconds(costs, budgets[s], prompt_len) for s in shards]
        balanced = [_ar_seconds(costs, budgets[s], prompt_len) for s in _longest_first(budgets, count)]
        sync = weight_gb / bandwidth_gbs if count > 1 else 0.0
        rows.append({"workers": count, "rows": len(budgets), "rollout_s": max(times),
                     "balanced_rollout_s": max(balanced), "weight_broadcast_s": sync})
    for row in rows:
        row["speedup_vs_1"] = rows[0]["rollout_s"] / (row["rollout_s"] + row["weight_broadcast_s"])
    return rows


def _longest_first(budgets: np.ndarray, count: int) -> list[np.ndarray]:
    """Rows dealt longest first to the least-loaded worker (by total tokens): the balance a scheduler
    that knew every length in advance would reach."""
    loads, shards = np.zeros(count), [[] for _ in range(count)]
    for row in np.argsort(-budgets, kind="stable"):
        target = int(loads.argmin())
        shards[target].append(row)
        loads[target] += budgets[row]
    return [np.array(s, dtype=np.int64) for s in shards]


def _ar_seconds(costs, budgets: np.ndarray, prompt_len: float = 256.0) -> float:
    """Plain decoding of rows with these lengths as one continuous batch: one step per token position,
    the batch shrinking as rows finish (a step's cost from the roofline at its rows and context)."""
    lengths = np.sort(budgets.astype(np.int64))
    total, start = 0.0, 0
    for i, length in enumerate(lengths):
        active = len(lengths) - i
        steps = int(length) - start
        if steps > 0:
            mid = start + steps / 2.0
            total += steps * costs.target(active, 1, active * (prompt_len + mid))
            start = int(length)
    return total


def run_distributed_bench(model: str = "smollm2-135m", prompts_file=None, num_prompts: int = 16, n: int = 4,
                          tokens: int = 48, tail_max: int = 192, workers: tuple[int, ...] = (1, 2),
                          big: bool = True) -> dict:
    import os

    threads = torch.get_num_threads()
    os.environ.setdefault("RESPEC_RAY_OBJECT_STORE_BYTES", str(6 * 1024 ** 3))  # the 1B model in bf16 fits
    connection = Connection(DistributedConfig(rollout_workers=max(workers), num_cpus=1, learner_actor=False).validate())
    try:
        llm = LLM(model, device="cpu")
        prompts = [llm.encode(q, chat=True) for q in load_questions(num_prompts, prompts_file)]
        rng = np.random.default_rng(0)
        budgets = np.clip(np.round(np.exp(np.log(tokens / 2) + 1.5 * rng.standard_normal(num_prompts))), 8, tail_max)
        result = {"model": model, "threads": threads, "prompts": num_prompts, "n": n, "tokens": tokens,
                  "scaling": scaling(model, prompts, n, tokens, list(workers), threads),
                  "long_tail": long_tail(model, prompts, n, [int(b) for b in budgets], max(workers), threads),
                  "budgets": [int(b) for b in budgets],
                  "fault": fault(model, prompts, n, tokens, max(workers), threads),
                  "weight_sync": [weight_sync(model, llm.model, max(workers))]}
        del llm
        if big:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                result["weight_sync"].append(weight_sync("llama-3.2-1b-shaped (random)", DecoderLM(
                    ModelConfig.from_hf(LLAMA_1B), dtype=torch.bfloat16), max(workers)))
        result["projection"] = projection([1, 2, 4, 8])
        return result
    finally:
        connection.close()


def format_distributed(result: dict) -> str:
    lines = [f"model={result['model']} threads={result['threads']} prompts={result['prompts']} x n={result['n']}",
             "", "| setup | seconds | tok/s | vs one process | identical |", "| --- | --- | --- | --- | --- |"]
    for row in result["scaling"]:
        lines.append(f"| {row['setup']} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{row['vs_one_process']:.2f}x | {row.get('identical_to_one_process', '-')} |")
    tail = result["long_tail"]
    mean = {s: float(np.mean([r["seconds"] for r in tail if r["schedule"] == s])) for s in ("static", "queue")}
    tail_line = (f"long tail (budgets {min(result['budgets'])}-{max(result['budgets'])} tokens): static shards "
                 f"{mean['static']:.2f} s, queue {mean['queue']:.2f} s -> queue {mean['static'] / mean['queue']:.2f}x")
    f = result["fault"]
    fault_line = (f"worker killed half-way: {f['samples']}/{f['expected_samples']} samples, identical to the "
                  f"fault-free run: {f['identical']}, {f['with_kill_s']:.2f} s vs {f['fault_free_s']:.2f} s "
                  f"(+{f['extra_s']:.2f} s); pool back to {f['workers_after']} workers")
    lines += ["", tail_line, fault_line, "",
              "| weights | dtype | MB | sync s (put + every worker loads) | put s | load s |", "| --- | --- | --- | --- | --- | --- |"]
    for row in result["weight_sync"]:
        lines.append(f"| {row['model']} | {row['dtype']} | {row['mb']:.0f} | {row['sync_s']:.3f} | {row['put_s']:.3f} | "
                     f"{row['load_s']:.3f} |")
    lines += ["", "projection (a model: simulated 7B/H100 AR long-tail rollout, static shards, 25 GB/s broadcast):", "",
              "| GPU workers | rollout s | balanced s | broadcast s | vs 1 |", "| --- | --- | --- | --- | --- |"]
    for row in result["projection"]:
        lines.append(f"| {row['workers']} | {row['rollout_s']:.1f} | {row['balanced_rollout_s']:.1f} | "
                     f"{row['weight_broadcast_s']:.2f} | {row['speedup_vs_1']:.2f}x |")
    return "\n".join(lines)
