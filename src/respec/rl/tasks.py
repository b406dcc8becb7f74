"""Tasks: prompts with gold answers, from a seeded arithmetic generator or a GSM8K-format JSONL file.

A ``Problem`` is a question and its gold answer (a number as text). Splits are disjoint by
construction: the generator draws train and eval problems from different seeds and drops eval
questions that also occur in train; a JSONL file is split by position after a seeded shuffle.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

TASK_NAMES = ("arithmetic", "gsm8k")

INSTRUCTION = "Solve the problem. End your reply with 'Answer: ' followed by the number."

NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # gold, as a plain number


def _level_1(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        return Problem(f"What is {a} + {b}?", str(a + b))
    a, b = max(a, b), min(a, b)
    return Problem(f"What is {a} - {b}?", str(a - b))


def _level_2(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 50), rng.randint(2, 30)
    if rng.random() < 0.5:
        return Problem(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                       str(a + b))
    a, b = max(a, b) + 1, min(a, b)
    return Problem(f"{name} has {a} {item} and gives away {b}. How many {item} are left?", str(a - b))


def _level_3(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    bags, each, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    return Problem(f"{name} has {bags} bags with {each} {item} in each bag, and {extra} loose {item}. "
                   f"How many {item} does {name} have in total?", str(bags * each + extra))


LEVELS = {1: _level_1, 2: _level_2, 3: _level_3}


def arithmetic_problems(count: int, seed: int, levels: tuple[int, ...] = (1, 2, 3)) -> list[Problem]:
    """``count`` problems cycling through ``levels`` of difficulty (1: bare sums, 2: one-step word
    problems, 3: two-step word problems)."""
    bad = [level for level in levels if level not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels: must be a non-empty subset of {sorted(LEVELS)}, got {list(levels)}")
    rng = random.Random(seed)
    return [LEVELS[levels[i % len(levels)]](rng) for i in range(count)]


def gsm8k_problems(path: str | Path) -> list[Problem]:
    """GSM8K format: one JSON object per line with ``question`` and ``answer`` ending in ``#### N``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: {path} does not exist")
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data: {path} line {number} is not JSON: {err}") from err
        if "question" not in record or "answer" not in record:
            raise ValueError(f"data: {path} line {number} needs 'question' and 'answer' fields")
        answer = str(record["answer"])
        if "####" not in answer:
            raise ValueError(f"data: {path} line {number}: answer does not end in '#### N'")
        problems.append(Problem(record["question"], answer.rsplit("####", 1)[1].strip().replace(",", "")))
    if not problems:
        raise ValueError(f"data: {path} holds no problems")
    return problems


def load_task(name: str, num_train: int, num_eval: int, seed: int, path: str | None = None,
              levels: tuple[int, ...] = (1, 2, 3)) -> tuple[list[Problem], list[Problem]]:
    """Train and eval problems of a task: ``arithmetic`` or ``gsm8k`` (a JSONL path)."""
    if name == "arithmetic":
        train = arithmetic_problems(num_train, seed, levels)
        seen = {p.question for p in train}
        pool = [p for p in arithmetic_problems(4 * num_eval + 64, seed + 1_000_003, levels) if p.question not in seen]
        if len(pool) < num_eval:
            raise ValueError(f"num_eval: only {len(pool)} distinct eval problems at levels {list(levels)}")
        return train, pool[:num_eval]
    if name == "gsm8k":
        if path is None:
            raise ValueError("task.path: the gsm8k task needs a JSONL file")
        problems = gsm8k_problems(path)
        random.Random(seed).shuffle(problems)
        if num_train + num_eval > len(problems):
            num_train = len(problems) - num_eval
        if num_train < 1:
            raise ValueError(f"num_eval: {num_eval} leaves no training problems in {path} ({len(problems)} in all)")
        return problems[num_eval: num_eval + num_train], problems[:num_eval]
    raise ValueError(f"task.name: unknown task {name!r}; use one of {TASK_NAMES}")


def chat_prompt(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}]
