"""Counters of several workers as one: the pool's ``GenerationStats``."""

from __future__ import annotations

import numpy as np

from ..engine.stats import GenerationStats, SpecStats, add_counts


def merge_stats(parts: list[GenerationStats]) -> GenerationStats:
    """The sum of ``parts`` (no decision trace: each worker's controller keeps its own)."""
    total = GenerationStats()
    spec = total.spec
    for part in parts:
        total.prompt_tokens += part.prompt_tokens
        total.generated_tokens += part.generated_tokens
        total.decode_steps += part.decode_steps
        total.prefill_s += part.prefill_s
        total.decode_s += part.decode_s
        total.absorb_s += part.absorb_s
        for arm, steps in part.arm_steps.items():
            total.arm_steps[arm] = total.arm_steps.get(arm, 0) + steps
        _merge_spec(spec, part.spec)
    return total


def _merge_spec(total: SpecStats, part: SpecStats) -> None:
    total.verify_steps += part.verify_steps
    total.drafted += part.drafted
    total.accepted += part.accepted
    total.emitted += part.emitted
    total.accepted_at = add_counts(total.accepted_at, np.asarray(part.accepted_at, dtype=np.int64))
    total.offered_at = add_counts(total.offered_at, np.asarray(part.offered_at, dtype=np.int64))
    total.histogram = add_counts(total.histogram, np.asarray(part.histogram, dtype=np.int64))
    for version, counts in part.by_version.items():
        mine = total.by_version.setdefault(version, [0, 0, 0, 0])
        for i, value in enumerate(counts):
            mine[i] += value
