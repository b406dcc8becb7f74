"""``respec bench --spec`` end to end on the tiny model, and where the table says SD stops paying."""

from __future__ import annotations

import json

from respec.bench.spec import format_spec_table, pay_limits, run_spec_bench


def _row(drafter, batch, speedup, temperature=0.7):
    return {"system": "sd", "drafter": drafter, "temperature": temperature, "batch_size": batch,
            "speedup_vs_ar": speedup}


def test_pay_limits_find_the_last_batch_where_sd_still_wins():
    rows = [_row("eagle", 1, 1.8), _row("eagle", 4, 1.2), _row("eagle", 16, 0.9), _row("eagle", 64, 1.05),
            _row("ngram", 1, 0.7), _row("ngram", 4, 1.1),
            {"system": "ar", "drafter": None, "temperature": 0.7, "batch_size": 1, "speedup_vs_ar": None}]
    limits = {r["drafter"]: r for r in pay_limits(rows)}
    assert limits["eagle"]["pays_up_to"] == 4 and limits["eagle"]["wins_at"] == [1, 4, 64]
    assert limits["ngram"]["pays_up_to"] is None and limits["ngram"]["wins_at"] == [4]


def test_spec_bench_on_a_tiny_model(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_CACHE_DIR", str(tmp_path / "cache"))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"{i} + {i}?"}) + "\n" for i in range(4)))
    result = run_spec_bench(str(tiny_llama), ["ngram", "self:1"], (1, 3), k=2, temperatures=(0.0, 0.7),
                            new_tokens=6, repeats=1, device="cpu", prompts_file=questions)
    rows = result["rows"]
    assert {(r["system"], r["drafter"]) for r in rows} == {("ar", None), ("sd", "ngram"), ("sd", "self:1")}
    assert len(rows) == 3 * 2 * 2
    assert all(r["accept_len"] >= 1.0 and r["speedup_vs_ar"] > 0 for r in rows if r["system"] == "sd")
    assert len(result["pays_up_to"]) == 4  # two drafters x two temperatures
    table = format_spec_table(result)
    assert "self:1 at T = 0.7: SD" in table
    json.dumps(result)
