"""How much speculation could ever save on a workload, from the target's cost model alone.

A drafter cannot make a step cheaper than the target's verify of its block, so an upper bound on any
speculative system's gain comes from the target's step times only: replay the workload's decaying
batch with every draft accepted (or with given acceptance rates) and no drafting cost, choosing the
best k at each step, and compare with plain decoding of the same budgets. On a device whose step time
grows with the tokens per step from a small batch on (a CPU), the bound shows where speculation can
pay at all; the benchmark reports it beside the measured figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

StepTime = Callable[[int, int], float]  # (active rows, tokens per row) -> seconds of one target forward


@dataclass(frozen=True)
class Headroom:
    ar_decode_s: float  # plain decoding of the budgets, one token per row per step
    bound_decode_s: float  # the best k each step, drafts accepted at ``rates``, drafting free
    ar_steps: int
    bound_steps: int
    prefill_s: float = 0.0  # the same for every system; counted in both totals

    @property
    def decode_speedup(self) -> float:
        return self.ar_decode_s / self.bound_decode_s

    @property
    def total_speedup(self) -> float:
        """The most any speculative system can gain on the whole workload, prefill included."""
        return (self.prefill_s + self.ar_decode_s) / (self.prefill_s + self.bound_decode_s)


def expected_block(rates: np.ndarray, k: int) -> float:
    """Tokens one row emits in a step with ``k`` drafts: 1 + sum of the chance each draft is reached
    and accepted (``rates[i]``: acceptance of draft i given draft i - 1 was accepted)."""
    return 1.0 + float(np.cumprod(rates[:k]).sum())


def speculation_headroom(budgets: list[int], step_time: StepTime, max_k: int, rates: np.ndarray | None = None,
                         prefill_s: float = 0.0) -> Headroom:
    """Decode ``budgets`` (tokens per row, the first sampled at prefill) AR and with the best k in
    0..``max_k`` per step. ``rates`` per draft position (default all 1: a perfect drafter)."""
    if max_k < 1:
        raise ValueError(f"max_k: must be >= 1, got {max_k}")
    rates = np.ones(max_k) if rates is None else np.asarray(rates, dtype=np.float64)
    if rates.shape != (max_k,) or np.any((rates < 0) | (rates > 1)):
        raise ValueError(f"rates: need {max_k} acceptance rates in [0, 1], got {rates.tolist()}")
    remaining = np.asarray(budgets, dtype=np.float64) - 1  # decode steps of AR per row
    if remaining.size == 0 or np.any(remaining < 0):
        raise ValueError("budgets: need at least one row, each of at least 1 token")
    ar = float(sum(step_time(int(np.count_nonzero(remaining > s)), 1) for s in range(int(remaining.max()))))
    blocks = np.array([expected_block(rates, k) for k in range(max_k + 1)])
    bound, steps = 0.0, 0
    while np.any(remaining > 1e-9):
        active = remaining[remaining > 1e-9]
        # Each row emits at most what it has left: a short row gains nothing from a long block.
        emitted = np.minimum(active[None, :], blocks[:, None]).sum(axis=1)
        seconds = np.array([step_time(active.size, k + 1) for k in range(max_k + 1)])
        best = int(np.argmax(emitted / seconds))
        remaining[remaining > 1e-9] = np.maximum(active - blocks[best], 0.0)
        bound += float(seconds[best])
        steps += 1
    return Headroom(ar, bound, int(max(budgets)) - 1, steps, prefill_s)


def rate_needed(budgets: list[int], step_time: StepTime, max_k: int, speedup: float, prefill_s: float = 0.0,
                tolerance: float = 1e-3) -> float | None:
    """The smallest acceptance rate, the same at every draft position, at which the bound reaches
    ``speedup`` over AR in total; None when not even a perfect drafter reaches it."""
    def total(rate: float) -> float:
        return speculation_headroom(budgets, step_time, max_k, np.full(max_k, rate), prefill_s).total_speedup

    if total(1.0) < speedup:
        return None
    low, high = 0.0, 1.0  # the bound grows with the rate: bisect
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) < speedup else (low, middle)
    return high
