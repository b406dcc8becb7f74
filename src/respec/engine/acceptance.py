"""Per-position acceptance of one drafter, as the adaptive controller estimates it (pure numpy)."""

from __future__ import annotations

import numpy as np


class AcceptanceEstimate:
    """Exponentially weighted per-position conditional acceptance of one drafter.

    Position i's rate is accepted-at-i / reached-i, where a row reaches i when it accepted all drafts
    before i (a row offered fewer drafts counts as a rejection, so short n-gram matches are priced in).
    Each position's past fades per row that reaches it, not per step: ``memory`` observations is its
    time constant whatever the batch and however rarely it is reached. A batch-1 step is one Bernoulli
    draw per position; forgetting per step left the estimate at batch 1 resting on a handful of draws,
    where two unlucky rejections locked a good drafter out.
    """

    def __init__(self, max_k: int, memory: float, prior: float, prior_weight: float = 1.0) -> None:
        self.memory, self.prior, self.prior_weight = memory, prior, prior_weight
        self.accepted = np.zeros(max_k)
        self.reached = np.zeros(max_k)

    def rates(self) -> np.ndarray:
        """The posterior means. Position 0's prior is ``prior``; position i's is position i - 1's
        posterior mean (a draft position is rarely reached, so its own evidence is thin, and the one
        before it is the best guess: a fixed prior there made k = 2 look as good as the prior however
        poor the drafter). Each prior counts as ``prior_weight`` observations."""
        rates = np.empty(len(self.accepted))
        prior = self.prior
        for i, (accepted, reached) in enumerate(zip(self.accepted, self.reached)):
            rates[i] = prior = (accepted + prior * self.prior_weight) / (reached + self.prior_weight)
        return rates

    def sample_rates(self, rng: np.random.Generator, sharpness: float = 1.0) -> np.ndarray:
        """One draw of the rates from Beta posteriors around ``rates`` (Thompson sampling), each
        observation counted ``sharpness`` times."""
        means = self.rates()
        weight = sharpness * self.reached + self.prior_weight
        return rng.beta(means * weight, (1 - means) * weight)

    def expected_emitted(self, k: int, rates: np.ndarray | None = None) -> float:
        """Tokens per row per step: 1 + sum over j <= k of P(the first j drafts are all accepted)."""
        return 1.0 + float(np.cumprod(self.rates() if rates is None else rates)[:k].sum())

    def relax(self, keep: float) -> None:
        """Keep only ``keep`` of the evidence (the drafter changed): the prior weighs more again."""
        self.accepted *= keep
        self.reached *= keep

    def record(self, num_accepted: np.ndarray, k: int) -> None:
        positions = np.arange(k)
        reached = (num_accepted[:, None] >= positions[None, :]).sum(0)
        accepted = (num_accepted[:, None] > positions[None, :]).sum(0)
        # A position a step does not reach keeps its evidence: fading it anyway let a deep position
        # relax to its prior (the position before's rate) while the controller ran a shorter k, and
        # sent it back to the longer k again and again.
        keep = np.exp(-reached / self.memory)
        self.accepted[:k] = self.accepted[:k] * keep + accepted
        self.reached[:k] = self.reached[:k] * keep + reached
