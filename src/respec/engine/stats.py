"""What the engine counts: tokens and time per phase, speculative acceptance, arms and the decision trace."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepRecord:
    """One decode step as the adaptive controller saw it (the decision trace)."""

    batch: int
    arm: str
    predicted_s: float
    measured_s: float
    emitted: int
    accepted: int


@dataclass
class SpecStats:
    """Cumulative speculative-decoding counters (acceptance length includes the bonus token)."""

    verify_steps: int = 0  # row-steps: one per active row per speculative step
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # per draft position: accepted count
    offered_at: list[int] = field(default_factory=list)  # per draft position: offered count
    histogram: list[int] = field(default_factory=list)  # accepted drafts per row-step: count of 0..k
    # per drafter weights version ("eagle@v3"): [row-steps, drafted, accepted, emitted]
    by_version: dict[str, list[int]] = field(default_factory=dict)

    @property
    def accept_len(self) -> float:
        """Tokens emitted per row per verify step (1 + accepted drafts), the usual tau."""
        return self.emitted / self.verify_steps if self.verify_steps else 0.0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accept_rate_at(self) -> list[float]:
        """Conditional acceptance per draft position: accepted there / offered and reached there."""
        return [a / o if o else 0.0 for a, o in zip(self.accepted_at, self.offered_at)]

    def record(self, num_accepted: np.ndarray, offered: np.ndarray, emitted: np.ndarray, k: int,
               version: str | None = None) -> None:
        if version is not None:
            counts = self.by_version.setdefault(version, [0, 0, 0, 0])
            for i, value in enumerate((len(num_accepted), offered.sum(), num_accepted.sum(), emitted.sum())):
                counts[i] += int(value)
        self.verify_steps += len(num_accepted)
        self.drafted += int(offered.sum())
        self.accepted += int(num_accepted.sum())
        self.emitted += int(emitted.sum())
        positions = np.arange(k)[None, :]
        reached = (positions <= num_accepted[:, None]) & (positions < offered[:, None])
        self.offered_at = add_counts(self.offered_at, reached.sum(0))
        self.accepted_at = add_counts(self.accepted_at, (positions < num_accepted[:, None]).sum(0))
        self.histogram = add_counts(self.histogram, np.bincount(num_accepted, minlength=k + 1))


def add_counts(totals: list[int], increments: np.ndarray) -> list[int]:
    """Element-wise sum of a running list and new counts, growing the list when k grows."""
    size = max(len(totals), len(increments))
    summed = np.zeros(size, dtype=np.int64)
    summed[: len(totals)] += np.asarray(totals, dtype=np.int64)
    summed[: len(increments)] += increments
    return summed.tolist()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    absorb_s: float = 0.0  # idle drafters catching up between steps (see ``Drafter.absorb_due``)
    spec: SpecStats = field(default_factory=SpecStats)
    arm_steps: dict[str, int] = field(default_factory=dict)  # decode steps per arm ("off", "ngram:4", ...)
    trace: list[StepRecord] = field(default_factory=list)  # per-step decisions (adaptive controller)

    @property
    def tokens_per_s(self) -> float:
        elapsed = self.prefill_s + self.decode_s
        return self.generated_tokens / elapsed if elapsed > 0 else 0.0


@dataclass
class TraceSummary:
    steps: int = 0
    arms: dict[str, int] = field(default_factory=dict)
    median_relative_error: float = float("nan")  # |predicted - measured| / measured, after warm-up


def summarize_trace(trace: list[StepRecord], warmup: int = 10) -> TraceSummary:
    arms: dict[str, int] = {}
    for record in trace:
        arms[record.arm] = arms.get(record.arm, 0) + 1
    later = trace[warmup:]
    errors = [abs(r.predicted_s - r.measured_s) / r.measured_s for r in later if r.measured_s > 0]
    return TraceSummary(len(trace), arms, float(np.median(errors)) if errors else float("nan"))
