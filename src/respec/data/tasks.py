"""Tasks and prompts: problems with gold answers from a seeded arithmetic generator or a GSM8K-format
JSONL file, and plain questions for benchmarks and offline drafter training.

A ``Problem`` is a question and its gold answer (a number as text). Splits are disjoint by
construction: the generator draws train and eval problems from different seeds and drops eval
questions that also occur in train; a JSONL file is split by position after a seeded shuffle.
Every JSONL row is read by ``read_jsonl``, which names the file and line of a bad row.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..utils.paths import GSM8K_ENV, gsm8k_path

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


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) of each row of a JSONL file (blank lines skipped), each checked to hold
    ``fields`` as non-empty text."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data: {path} line {number} is not JSON: {err}") from err
        if not isinstance(record, dict) or any(name not in record for name in fields):
            raise ValueError(f"data: {path} line {number} needs {' and '.join(repr(f) for f in fields)} fields, "
                             f"got {_clip(line)}")
        for name in fields:
            if not isinstance(record[name], str) or not record[name].strip():
                raise ValueError(f"data: {path} line {number}: {name!r} must be non-empty text, got {record[name]!r}")
        records.append((number, record))
    if not records:
        raise ValueError(f"data: {path} holds no rows")
    return records


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def gsm8k_problems(path: str | Path) -> list[Problem]:
    """GSM8K format: one JSON object per line with ``question`` and ``answer`` ending in ``#### N``."""
    problems = []
    for number, record in read_jsonl(path, ("question", "answer")):
        answer = str(record["answer"])
        if "####" not in answer:
            raise ValueError(f"data: {path} line {number}: answer does not end in '#### N'")
        problems.append(Problem(record["question"], answer.rsplit("####", 1)[1].strip().replace(",", "")))
    return problems


def load_questions(count: int, path: str | Path | None = None, seed: int = 0) -> list[str]:
    """The first ``count`` questions of a JSONL file with a ``question`` field (default: the GSM8K file
    named by ``$RESPEC_GSM8K``), else ``count`` built-in arithmetic questions."""
    source = path if path is not None else gsm8k_path()
    if source is None:
        return arithmetic_questions(count, seed)
    return [str(record["question"]) for _, record in read_jsonl(source, ("question",))[:count]]


def question_source(path: str | Path | None = None) -> str:
    """Where ``load_questions(count, path)`` takes its questions from, for a benchmark's record."""
    source = path if path is not None else gsm8k_path()
    return str(source) if source is not None else "arithmetic (built-in)"


def arithmetic_questions(count: int, seed: int = 0) -> list[str]:
    """Built-in prompts for machines without a GSM8K file."""
    rng = random.Random(seed)
    return [f"What is {rng.randint(10, 999)} + {rng.randint(10, 999)}?" for _ in range(count)]


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
        path = path or gsm8k_path()
        if path is None:
            raise ValueError(f"data: the gsm8k task needs a GSM8K-format JSONL file (task.path, or ${GSM8K_ENV})")
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
