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


def test_questions_come_from_a_file_the_environment_names_or_the_generator(tmp_path, monkeypatch):
    from respec.data.tasks import arithmetic_questions, load_questions

    monkeypatch.delenv("RESPEC_GSM8K", raising=False)
    assert load_questions(3) == arithmetic_questions(3)
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) for i in range(5)) + "\n")
    monkeypatch.setenv("RESPEC_GSM8K", str(path))
    assert load_questions(2) == ["q0", "q1"]
    assert load_task("gsm8k", 3, 2, seed=0)[1][0].answer == "1"  # task.path unset: the same file
    path.write_text(json.dumps({"prompt": "no question field"}) + "\n")
    with pytest.raises(ValueError, match="line 1 needs 'question'"):
        load_questions(2)
    monkeypatch.delenv("RESPEC_GSM8K")
    with pytest.raises(ValueError, match="RESPEC_GSM8K"):
        load_task("gsm8k", 3, 2, seed=0)


def test_the_real_gsm8k_split_loads_when_present():
    """The GSM8K training split named by $RESPEC_GSM8K (``make test`` sets it when a copy sits beside
    the checkout): every row parses to a plain number; skipped on a machine without it."""
    from respec.utils.paths import gsm8k_path

    path = gsm8k_path()
    if path is None:
        pytest.skip("no GSM8K file: set RESPEC_GSM8K to a GSM8K-format train.jsonl")
    problems = gsm8k_problems(path)
    assert len(problems) > 1000
    assert all(p.answer.lstrip("-").replace(".", "", 1).isdigit() for p in problems)
    train, held_out = load_task("gsm8k", 500, 50, seed=0, path=str(path))
    assert len(train) == 500 and not {p.question for p in train} & {p.question for p in held_out}


@pytest.mark.parametrize("row, message", [
    ("5", "line 2 needs 'question' and 'answer' fields, got 5"),
    ("[1, 2]", "line 2 needs 'question' and 'answer' fields"),
    (json.dumps({"question": None, "answer": "#### 3"}), "line 2: 'question' must be non-empty text, got None"),
    (json.dumps({"question": "  ", "answer": "#### 3"}), "line 2: 'question' must be non-empty text"),
    ("{not json", "line 2 is not JSON"),
])
def test_a_bad_gsm8k_row_is_named_by_file_and_line(tmp_path, row, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + row + "\n")
    with pytest.raises(ValueError, match=f"^data: {path} {message}".replace("[", r"\[").replace("(", r"\(")):
        gsm8k_problems(path)
