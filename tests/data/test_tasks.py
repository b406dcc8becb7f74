"""Tasks: the seeded arithmetic generator, GSM8K-format files, question lists."""

from __future__ import annotations

import json

import pytest

from respec.data.tasks import arithmetic_problems, gsm8k_problems, load_task
from respec.rl.rewards import correctness_reward


def test_arithmetic_problems_are_seeded_and_correct():
    problems = arithmetic_problems(30, seed=3)
    assert problems == arithmetic_problems(30, seed=3) and problems != arithmetic_problems(30, seed=4)
    assert correctness_reward([f"Answer: {p.answer}" for p in problems], [p.answer for p in problems]) == [1.0] * 30
    train, held_out = load_task("arithmetic", 200, 50, seed=0)
    assert len(held_out) == 50 and not {p.question for p in train} & {p.question for p in held_out}
    with pytest.raises(ValueError, match="levels"):
        arithmetic_problems(3, 0, levels=(7,))


def test_gsm8k_loader_reads_answers_and_names_bad_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "q1", "answer": "steps\n#### 1,200"}) + "\n"
                    + json.dumps({"question": "q2", "answer": "#### 7"}) + "\n")
    assert [p.answer for p in gsm8k_problems(good)] == ["1200", "7"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q1", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        gsm8k_problems(bad)
    with pytest.raises(ValueError, match="does not exist"):
        gsm8k_problems(tmp_path / "missing.jsonl")
