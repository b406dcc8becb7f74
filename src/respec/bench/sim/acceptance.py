"""Per-position acceptance of a drafter: measured curves, what a draft tree makes of them, and drift.

A curve gives alpha_i, the chance that draft i is accepted given drafts 1..i-1 were (chain drafts, as
the engine's arms run them). The curves:

* ``ours-gsm8k``: the gsm8k-1536 EAGLE head, held-out alpha per position 0.50 0.45 0.42 0.40
  (docs/benchmarks.md, offline head table), continued past position 4 at its last ratio;
* ``eagle3-published``: the public EAGLE-3 head of Llama-3.1-8B, chain of 7 drafts at T = 1 on GSM8K,
  acceptance length 3.34 (its published comparison table); modelled as a near-flat curve
  a x 0.97^i (training-time test keeps deep positions close to the first), a solved from 3.34;
* ``paper-fit``: the ReSpec paper's EAGLE-3 drafter for Qwen2.5-7B at T = 0.6, the same shape with a
  fitted by calibrate.py to the paper's speedup grid (the paper gives no acceptance curve).

A tree (s, t, n): depth s, t candidates per expansion, n nodes verified per row. Its nodes beyond the
main chain are spread evenly over the depths as siblings of the chain node, at most t - 1 each, so
depth i offers m = 1 + min(t - 1, (n - 1 - s) / s) candidates; the j-th candidate (in draft order) is
accepted after the earlier ones were rejected with chance alpha_i x rho^j (rho = 0.5: each further
candidate carries about half the remaining mass). A chain of k drafts is the tree (k, 1, k + 1).

Drift over RL steps (a frozen drafter goes stale, an online one keeps up or gains): every rate is
scaled by one factor per RL step, chosen so that the chain acceptance length at ``REFERENCE_K`` moves
to ``ratio`` times its start linearly over ``steps`` RL steps, and stays there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_K = 8  # chain drafts the simulated engine offers (the controller's default max_draft_tokens)
REFERENCE_K = 4  # chain length at which a drift's acceptance-length ratio is measured
SIBLING_DECAY = 0.5  # rho above
FLAT_DECAY = 0.97  # per-position decay of the EAGLE-3-shaped curves
MAX_RATE = 0.98


def chain_tau(rates: np.ndarray, k: int) -> float:
    """Expected tokens per row of a chain step with k drafts: 1 + sum of the reach of each draft."""
    return 1.0 + float(np.cumprod(np.asarray(rates, dtype=np.float64)[:k]).sum())


def flat_curve(first: float, length: int = MAX_K, decay: float = FLAT_DECAY) -> np.ndarray:
    return np.minimum(first * decay ** np.arange(length), MAX_RATE)


def solve_first(tau: float, k: int, decay: float = FLAT_DECAY) -> float:
    """The first-position rate of a ``flat_curve`` whose chain of ``k`` drafts reaches ``tau``."""
    low, high = 0.0, MAX_RATE
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if chain_tau(flat_curve(middle, k, decay), k) < tau else (low, middle)
    return high


def extend(measured: list[float], length: int = MAX_K) -> np.ndarray:
    """A measured curve continued at its last ratio."""
    rates = list(measured)
    ratio = rates[-1] / rates[-2] if len(rates) > 1 else 1.0
    while len(rates) < length:
        rates.append(rates[-1] * ratio)
    return np.minimum(np.array(rates[:length]), MAX_RATE)


PAPER_FIRST_RATE = 0.7759  # calibrate.fit_paper_stack
CURVES = {
    "ours-gsm8k": extend([0.50, 0.45, 0.42, 0.40]),
    "eagle3-published": flat_curve(solve_first(3.34, 7)),
    "paper-fit": flat_curve(PAPER_FIRST_RATE),
}


def tree_depth_rates(rates: np.ndarray, depth: int, width: int, nodes: int,
                     rho: float = SIBLING_DECAY) -> np.ndarray:
    """Per-depth acceptance of a tree (s = depth, t = width, n = nodes) built on chain ``rates``."""
    siblings = 1.0 + min(width - 1.0, max(nodes - 1.0 - depth, 0.0) / depth)
    whole, part = int(np.floor(siblings)), siblings - np.floor(siblings)
    alpha = np.asarray(rates, dtype=np.float64)[:depth]
    rejected = np.prod([1.0 - alpha * rho ** j for j in range(whole)], axis=0) * (1.0 - part * alpha * rho ** whole)
    return 1.0 - rejected


def tree_tau(rates: np.ndarray, depth: int, width: int, nodes: int) -> float:
    return chain_tau(tree_depth_rates(rates, depth, width, nodes), depth)


def scale_for_ratio(rates: np.ndarray, ratio: float, k: int = REFERENCE_K) -> float:
    """The factor on every rate that moves the chain's acceptance length at ``k`` by ``ratio``."""
    target = ratio * chain_tau(rates, k)
    low, high = 0.0, MAX_RATE / max(float(np.max(rates)), 1e-9)
    if chain_tau(np.minimum(rates * high, MAX_RATE), k) <= target:
        return high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if chain_tau(np.minimum(rates * middle, MAX_RATE), k) < target else (low, middle)
    return high


@dataclass(frozen=True)
class Drift:
    """The acceptance length at REFERENCE_K moves to ``ratio`` x its start over ``steps`` RL steps."""

    name: str = "none"
    ratio: float = 1.0
    steps: int = 1
    publishes: bool = False  # an online learner: new drafter weights every RL step

    def ratio_at(self, rl_step: int) -> float:
        return 1.0 + (self.ratio - 1.0) * min(max(rl_step, 0) / self.steps, 1.0)

    def rates_at(self, rates: np.ndarray, rl_step: int) -> np.ndarray:
        return np.minimum(rates * scale_for_ratio(rates, self.ratio_at(rl_step)), MAX_RATE)


DRIFTS = {
    "none": Drift(),
    # The paper's Fig. 4: a frozen EAGLE-3 drafter's acceptance length 3.5-4 -> 2-2.5 within 100 steps.
    "frozen-paper": Drift("frozen-paper", 2.25 / 3.75, 100),
    # respec bench --online, frozen arm: 1.84 -> 1.50 (first to last third of 15 steps, ~10 steps apart).
    "frozen-ours": Drift("frozen-ours", 1.50 / 1.84, 10),
    # respec bench --online, online arms: 1.82 -> 2.09 (unweighted KD, sync).
    "online-ours": Drift("online-ours", 2.09 / 1.82, 10, publishes=True),
    # An online learner that holds the drafter at its start (the paper's ReSpec keeps 3.5-4), new
    # weights published every RL step.
    "online-held": Drift("online-held", 1.0, 1, publishes=True),
}


def row_rates(rates: np.ndarray, rows: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Per-row curves ``[rows, len]``: each row's logits shifted by one N(0, spread^2) draw (some
    prompts are easier to draft than others)."""
    logits = np.log(rates) - np.log1p(-np.minimum(rates, MAX_RATE))
    shifted = logits[None, :] + spread * rng.standard_normal((rows, 1))
    return np.minimum(1.0 / (1.0 + np.exp(-shifted)), MAX_RATE)
