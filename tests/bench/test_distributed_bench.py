"""`respec bench --distributed`: the GPU projection's arithmetic and the table (the Ray parts run in
tests/distributed)."""

from __future__ import annotations

import numpy as np

from respec.bench.distributed import _longest_first, format_distributed, projection


def test_the_projection_shrinks_with_workers_and_the_long_tail_bounds_it():
    rows = projection([1, 2, 4, 8])
    times = [r["rollout_s"] for r in rows]
    assert times == sorted(times, reverse=True) and rows[0]["speedup_vs_1"] == 1.0
    assert all(r["balanced_rollout_s"] <= r["rollout_s"] * 1.001 for r in rows)
    assert rows[-1]["speedup_vs_1"] < 8 / 2  # the longest rows decode alone: far from linear


def test_longest_first_balances_tokens():
    budgets = np.array([100, 1, 1, 1, 50, 50])
    shards = _longest_first(budgets, 2)
    loads = sorted(int(budgets[s].sum()) for s in shards)
    assert loads[1] - loads[0] <= 1
    assert sorted(np.concatenate(shards).tolist()) == list(range(6))


def test_the_table_names_every_figure():
    result = {"model": "m", "threads": 2, "prompts": 4, "n": 2, "budgets": [8, 40],
              "scaling": [{"setup": "one process, 2 threads", "seconds": 2.0, "tokens_per_s": 10.0, "vs_one_process": 1.0},
                          {"setup": "2 worker(s) x 1 thread(s)", "seconds": 1.5, "tokens_per_s": 13.3,
                           "vs_one_process": 1.33, "identical_to_one_process": True}],
              "long_tail": [{"schedule": "static", "seconds": 3.0}, {"schedule": "queue", "seconds": 2.0}],
              "fault": {"samples": 8, "expected_samples": 8, "identical": True, "with_kill_s": 3.0,
                        "fault_free_s": 2.0, "extra_s": 1.0, "workers_after": 2},
              "weight_sync": [{"model": "m", "dtype": "torch.float32", "mb": 538.0, "sync_s": 1.0, "put_s": 0.5,
                               "load_s": 0.4}],
              "projection": projection([1, 2])}
    table = format_distributed(result)
    assert "queue 1.50x" in table and "(+1.00 s)" in table and "| m | torch.float32 | 538 |" in table
