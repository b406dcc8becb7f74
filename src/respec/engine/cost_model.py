"""What a decode step costs: a start-up profile of the target, refined online from measured steps.

The target's time for a forward over ``tokens`` new positions in each of ``batch`` rows comes from a
start-up profile on a grid (batch 1, 2, 4, ... x tokens 1 .. K+1; profile.py). Each step's measured time then corrects the grid
entry it fell on (an exponentially weighted ratio measured / profiled; at first a mean with the
prior), which also absorbs
what the profile leaves out (sampling, verification, book-keeping). An entry not measured yet borrows
the correction of the nearest measured batch size with the same tokens per row: that overhead changes
slowly with the batch, so a decaying batch (a rollout's long tail) does not pay to learn it again at
every size. A drafter's time per draft step is learned online only, per batch bucket.
"""

from __future__ import annotations

import os

import numpy as np

from ..models.decoder import DecoderLM
from .profile import profile_table

# Once a grid cell has a few measurements, one step counts as at most this factor off its estimate:
# a stall of 2x would otherwise shift an arm's predicted time by a fifth and flip the choice.
SPIKE = 1.25


class CostModel:
    """Predicted seconds of a target forward, a drafter's proposal and a drafter's catch-up."""

    def __init__(self, batches: list[int], table: np.ndarray, decay: float = 0.8) -> None:
        if table.shape[0] != len(batches) or table.ndim != 2:
            raise ValueError(f"profile: table shape {table.shape} does not match {len(batches)} batch sizes")
        self.batches = np.asarray(batches, dtype=np.float64)
        self.table = np.asarray(table, dtype=np.float64)  # [batches, tokens 1..T]
        self.correction = np.ones_like(self.table)
        self.observed = np.zeros(self.table.shape, dtype=np.int64)  # measurements per entry
        self.decay = decay
        self.draft_step: dict[str, np.ndarray] = {}  # drafter -> seconds per draft step per bucket (nan = unknown)
        self.catch_up_scale: dict[str, float] = {}  # drafter -> measured / modelled catch-up time (EW)

    @property
    def max_tokens(self) -> int:
        return self.table.shape[1]

    def bucket(self, batch: int) -> int:
        return int(np.abs(np.log2(self.batches) - np.log2(max(batch, 1))).argmin())

    def _profiled(self, batch: int, tokens: int) -> float:
        column = self.table[:, min(tokens, self.max_tokens) - 1]
        value = float(np.interp(batch, self.batches, column))
        if batch > self.batches[-1]:  # past the grid: linear in the batch
            value *= batch / self.batches[-1]
        if tokens > self.max_tokens:  # past the grid: linear in the tokens per row
            row = self.table[self.bucket(batch)]
            per_token = (row[-1] - row[0]) / max(self.max_tokens - 1, 1)
            value += per_token * (tokens - self.max_tokens)
        return value

    def _correction(self, bucket: int, column: int) -> float:
        if self.observed[bucket, column]:
            return float(self.correction[bucket, column])
        measured = np.flatnonzero(self.observed[:, column])
        if measured.size == 0:
            return 1.0
        return float(self.correction[measured[np.abs(measured - bucket).argmin()], column])

    def observations(self, batch: int, tokens: np.ndarray) -> np.ndarray:
        """Steps measured on the grid cells that (batch, tokens[i]) steps fall on."""
        return self.observed[self.bucket(batch), np.minimum(tokens, self.max_tokens) - 1]

    def target_time(self, batch: int, tokens: int) -> float:
        """A step of the target over ``tokens`` positions per row (AR: 1, verify: k + 1), all included."""
        return self._profiled(batch, tokens) * self._correction(self.bucket(batch), min(tokens, self.max_tokens) - 1)

    def draft_time(self, drafter: str, batch: int, k: int) -> float:
        """``k`` draft steps; a drafter never measured at any batch size costs 0 (optimism: try it)."""
        known = self.draft_step.get(drafter)
        if known is None or np.all(np.isnan(known)):
            return 0.0
        bucket = self.bucket(batch)
        if np.isnan(known[bucket]):  # the nearest measured bucket stands in
            measured = np.flatnonzero(~np.isnan(known))
            bucket = int(measured[np.abs(measured - bucket).argmin()])
        return float(known[bucket]) * k

    def catch_up_time(self, kind: str, drafter: str, batch: int, missed: float, reread: float | None = None) -> float:
        """Bringing a drafter up to date after ``missed`` tokens per row decoded without it, of which a
        "target" drafter must re-read ``reread`` (default: all) from the target (the rest it shadowed)."""
        return self._catch_up_model(kind, drafter, batch, missed, reread) * self.catch_up_scale.get(drafter, 1.0)

    def _catch_up_model(self, kind: str, drafter: str, batch: int, missed: float, reread: float | None) -> float:
        if missed <= 0 or kind == "none":
            return 0.0
        own = self.draft_time(drafter, batch, 1) * self._extend_factor(batch, missed)
        reread = missed if reread is None else reread
        if kind == "target" and reread > 0:  # a read-only target pass over the positions not shadowed
            return self._profiled(batch, max(1, round(reread))) + own
        return own

    def _extend_factor(self, batch: int, entries: float) -> float:
        """The drafter's own extend pass over ``entries`` per row, in draft steps: it grows with the
        entries as a target forward over as many tokens per row grows over a one-token step, since
        both are one weight read plus per-token work (flat while memory bound at small batch, linear
        once compute bound at large batch); at least one step, as a pass costs a call like a step."""
        return max(1.0, self._profiled(batch, max(1, round(entries))) / self._profiled(batch, 1))

    def record_catch_up(self, kind: str, drafter: str, batch: int, missed: float, seconds: float,
                        reread: float | None = None) -> None:
        modelled = self._catch_up_model(kind, drafter, batch, missed, reread)
        if modelled <= 0 or seconds <= 0:
            return
        old = self.catch_up_scale.get(drafter)
        ratio = seconds / modelled
        self.catch_up_scale[drafter] = ratio if old is None else self.decay * old + (1 - self.decay) * ratio

    def record_target(self, batch: int, tokens: int, seconds: float) -> None:
        profiled = self._profiled(batch, tokens)
        if profiled <= 0 or seconds <= 0:
            return
        at = self.bucket(batch), min(tokens, self.max_tokens) - 1
        # A mean with one pseudo-measurement of the prior (the borrowed correction, or 1) until the
        # exponentially weighted average takes over: one noisy step cannot condemn an arm.
        weight = max(1 - self.decay, 1 / (self.observed[at] + 2))
        current, ratio = self._correction(*at), seconds / profiled
        if self.observed[at] >= 2:  # a shared machine stalls a step now and then: one spike moves it a little
            ratio = min(max(ratio, current / SPIKE), current * SPIKE)
        self.correction[at] = (1 - weight) * current + weight * ratio
        self.observed[at] += 1

    def record_draft(self, drafter: str, batch: int, k: int, seconds: float) -> None:
        known = self.draft_step.setdefault(drafter, np.full(len(self.batches), np.nan))
        bucket, per_step = self.bucket(batch), seconds / max(k, 1)
        old = known[bucket]
        known[bucket] = per_step if np.isnan(old) else self.decay * old + (1 - self.decay) * per_step

    # ---------------------------------------------------------------- profile
    @classmethod
    def profile(cls, model: DecoderLM, max_batch: int, max_tokens: int, *, cache_dir: str | os.PathLike | None = None,
                decay: float = 0.8, progress: bool = True) -> CostModel:
        """The target's step times on the grid (``profile.profile_table``: timed once, then cached)."""
        batches, table = profile_table(model, max_batch, max_tokens, cache_dir=cache_dir, progress=progress)
        return cls(batches, table, decay)
