"""The target's answers that ``respec drafter train`` distils from, and their file on disk.

Generating the answers is most of the cost of training a head offline (an hour for 2k GSM8K
answers on 2 CPU cores), so ``--examples FILE`` keeps them: the first run writes them, later runs
(more epochs, another learning rate, ``--init-from`` a saved head) read them back, and several files
(``--examples a.jsonl,b.jsonl``: say GSM8K and arithmetic answers) train one head. The file is JSON
lines: a header naming the model, its vocabulary size and the sampling settings, then one answer per
line (prompt + response token ids and the prompt length).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.atomic import write_text_atomic

ANSWERS_FORMAT = "respec-drafter-answers-v1"


@dataclass
class Example:
    tokens: torch.Tensor  # [T] prompt + response
    prompt_len: int
    features: torch.Tensor | None = None  # [T, 3D] (bf16 to halve memory)
    logits: torch.Tensor | None = None  # [T - prompt_len + 1, V']: only the trained entries (bf16)


def save_answers(path: str | os.PathLike, examples: list[Example], header: dict) -> None:
    """Write the answers atomically (a staging file renamed into place)."""
    lines = [json.dumps({"format": ANSWERS_FORMAT, **header})]
    lines += [json.dumps({"tokens": ex.tokens.tolist(), "prompt_len": ex.prompt_len}) for ex in examples]
    write_text_atomic(path, "\n".join(lines) + "\n")


def load_answers(path: str | os.PathLike, count: int | None, vocab_size: int) -> tuple[list[Example], dict]:
    """The first ``count`` answers (None: all) of a file written by ``save_answers`` for a target whose
    vocabulary has ``vocab_size`` tokens, and the file's header."""
    path = Path(path)
    lines = path.read_text().splitlines()
    header = _parse(path, 1, lines[0] if lines else "")
    if header.get("format") != ANSWERS_FORMAT:
        raise ValueError(f"examples: {path} is not a drafter answers file (format {header.get('format')!r}, "
                         f"expected {ANSWERS_FORMAT!r})")
    if header.get("vocab_size") != vocab_size:
        raise ValueError(f"examples: {path} was generated with a vocabulary of {header.get('vocab_size')} tokens, "
                         f"the target has {vocab_size}")
    rows = [line for line in lines[1:] if line.strip()]
    count = len(rows) if count is None else count
    if len(rows) < count:
        raise ValueError(f"examples: {path} holds {len(rows)} answers, num_prompts asks for {count}")
    examples = []
    for number, line in enumerate(rows[:count], start=2):
        row = _parse(path, number, line)
        tokens, prompt_len = row.get("tokens"), row.get("prompt_len")
        if not isinstance(tokens, list) or not isinstance(prompt_len, int) or not 0 < prompt_len <= len(tokens) \
                or not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
            raise ValueError(f"examples: {path} line {number}: needs 'tokens' (ids below {vocab_size}) and "
                             f"'prompt_len' (0 < prompt_len <= len(tokens))")
        examples.append(Example(torch.tensor(tokens), prompt_len))
    return examples, header


def _parse(path: Path, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError as err:
        raise ValueError(f"examples: {path} line {number}: not JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"examples: {path} line {number}: expected a JSON object")
    return value


def load_answer_files(paths: list[Path], vocab_size: int) -> list[Example]:
    """Every answer of each file, merged by relative position (an answer 10% into its file comes among
    the first 10% of the result), so that the first answers, the held-out share, take the same fraction
    of every file however their sizes differ."""
    sources = [load_answers(path, None, vocab_size)[0] for path in paths]
    keyed = [((index + 0.5) / len(source), file, example) for file, source in enumerate(sources)
             for index, example in enumerate(source)]
    return [example for _, _, example in sorted(keyed, key=lambda item: item[:2])]
