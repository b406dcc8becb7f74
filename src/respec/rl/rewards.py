"""Rewards: plain functions ``(completions, gold) -> list[float]``, combinable with weights.

Correctness is decided by ``math-verify`` (both sides parsed, so "$1,200", "1200.0" and "1200" agree);
when a completion has an ``Answer:`` line, only what follows the last one is parsed, so a number
mentioned on the way is not taken for the answer.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

RewardFn = Callable[[list[str], list[str]], list[float]]

ANSWER_TAG = re.compile(r"answer\s*(?:is)?\s*[:=]", re.IGNORECASE)
FINAL_LINE = re.compile(r"answer\s*:\s*\$?-?[\d,]+(?:\.\d+)?\s*\$?\.?\s*$", re.IGNORECASE)


def final_answer_text(completion: str) -> str:
    """The part of a completion that states its answer: after the last ``Answer:`` when there is one."""
    tags = list(ANSWER_TAG.finditer(completion))
    return completion[tags[-1].end():] if tags else completion


def _timeout() -> int | None:
    # math-verify's timeout uses signals, which only work on the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(text: str):
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout())


def is_correct(completion: str, gold: str) -> bool:
    from math_verify import verify

    answer = _parse(final_answer_text(completion))
    if not answer:
        return False
    return bool(verify(_parse(gold), answer, timeout_seconds=_timeout()))


def correctness_reward(completions: list[str], gold: list[str]) -> list[float]:
    _check_lengths(completions, gold)
    return [1.0 if is_correct(c, g) else 0.0 for c, g in zip(completions, gold)]


def format_reward(completions: list[str], gold: list[str]) -> list[float]:
    """1 when the completion ends with an ``Answer: N`` line, whatever N is."""
    _check_lengths(completions, gold)
    return [1.0 if FINAL_LINE.search(c.strip()) else 0.0 for c in completions]


REWARDS: dict[str, RewardFn] = {"correctness": correctness_reward, "format": format_reward}


def combine(weights: dict[str, float]) -> RewardFn:
    """A weighted sum of named rewards (see ``REWARDS``)."""
    unknown = [name for name in weights if name not in REWARDS]
    if unknown or not weights:
        raise ValueError(f"reward.weights: unknown reward(s) {unknown}; choose from {sorted(REWARDS)}"
                         if unknown else "reward.weights: empty; give at least one reward")

    def reward(completions: list[str], gold: list[str]) -> list[float]:
        total = [0.0] * len(completions)
        for name, weight in weights.items():
            for i, value in enumerate(REWARDS[name](completions, gold)):
                total[i] += weight * value
        return total

    return reward


def _check_lengths(completions: list[str], gold: list[str]) -> None:
    if len(completions) != len(gold):
        raise ValueError(f"gold: {len(gold)} answers for {len(completions)} completions")
