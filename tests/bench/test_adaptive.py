"""``respec bench --adaptive`` end to end on the tiny model: the table, the JSON and the trace plot."""

from __future__ import annotations

import json

from respec.bench.adaptive import (
    _in_turn,
    format_adaptive_table,
    long_tail_budgets,
    repeat_params,
    run_adaptive_bench,
)
from respec.bench.common import write_json


def test_long_tail_budgets_are_heavy_tailed_and_capped():
    budgets = long_tail_budgets(1000, 16, 256, 1.2, seed=0)
    assert min(budgets) >= 16 and max(budgets) == 256
    assert sorted(budgets)[500] < 40 < sum(budgets) / len(budgets)  # median well below the mean


def test_each_repeat_samples_new_answers_with_seeds_shared_by_every_system():
    """A static arm's answers are a function of the seeds: with the same seeds in every repeat the
    median would average timing noise only, never the luck of one sampled answer (its acceptance)."""
    first, again, second = (repeat_params([8, 9], 0.7, 0, repeat) for repeat in (0, 0, 1))
    assert [p.seed for p in first] == [p.seed for p in again]
    assert len({p.seed for p in first + second}) == 4
    assert [p.max_new_tokens for p in second] == [8, 9] and all(p.ignore_eos for p in second)


def test_systems_take_turns_in_a_new_seeded_order_each_repeat():
    systems = {name: None for name in "abcdef"}
    orders = [[name for name, _ in _in_turn(systems, 0, repeat)] for repeat in range(4)]
    assert all(sorted(order) == list("abcdef") for order in orders)
    assert len({tuple(order) for order in orders}) > 1
    assert orders[2] == [name for name, _ in _in_turn(systems, 0, 2)]


def test_adaptive_bench_on_a_tiny_model(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_CACHE_DIR", str(tmp_path / "cache"))
    questions = tmp_path / "questions.jsonl"  # short: the tiny tokenizer spends a token per byte
    questions.write_text("".join(json.dumps({"question": f"{i} + {i}?"}) + "\n" for i in range(8)))
    result = run_adaptive_bench(str(tiny_llama), ["ngram", "self:1"], (1, 3), (1, 2), temperature=0.7,
                                new_tokens=8, repeats=2, device="cpu", prompts_file=questions, long_tail_rows=6,
                                long_tail_max=20, trace_dir=tmp_path)
    write_json(result, tmp_path / "adaptive.json")
    rows = json.loads((tmp_path / "adaptive.json").read_text())["rows"]
    configs = {r["config"] for r in rows}
    assert configs == {"off", "ngram:1", "ngram:2", "self:1:1", "self:1:2", "adaptive"}
    assert {(r["workload"], r["batch_size"]) for r in rows} == {("fixed", 1), ("fixed", 3), ("long-tail", 6)}
    adaptive = [r for r in rows if r["system"] == "adaptive"]
    assert all(r["vs_best_other"] > 0 and r["vs_best_paired"] > 0 and sum(r["arms"].values()) > 0 for r in adaptive)
    assert all(len(r["runs_tokens_per_s"]) == 2 for r in rows)
    assert result["long_tail_trace"] and (tmp_path / "adaptive_trace.png").stat().st_size > 0
    assert "controller: median" in format_adaptive_table(result)
    room = result["long_tail_headroom"]
    assert set(room["bounds"]) >= {"perfect, k <= 4"} and len(room["bounds"]) == 3  # + ngram and self:1
    assert room["ar_prefill_s"] > 0 and room["ar_decode_modelled_s"] > 0
    assert all(b["total_speedup"] > 0 for b in room["bounds"].values())
    assert "long-tail headroom" in format_adaptive_table(result)
    assert room["rate_needed_for_target"] is None or 0 < room["rate_needed_for_target"] <= 1

    fixed_only = run_adaptive_bench(str(tiny_llama), ["ngram"], (2,), (1,), temperature=0.7, new_tokens=4, repeats=1,
                                    device="cpu", prompts_file=questions, long_tail_rows=0)
    assert {r["workload"] for r in fixed_only["rows"]} == {"fixed"} and not fixed_only["long_tail_trace"]
    assert fixed_only["long_tail_headroom"] is None
