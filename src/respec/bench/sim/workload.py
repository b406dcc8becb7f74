"""One engine's share of an RL rollout: prompt lengths and long-tailed response lengths.

Reasoning RL answers are long-tailed: most finish in a few thousand tokens, a few run to the length
cap (8-16k) and keep a handful of rows decoding long after the rest finished (the paper's Fig. 6:
the active batch per engine falls from ~26 to a tail near 1). Response lengths are lognormal around
``median`` with log-sd ``sigma``, clipped to [``min_len``, ``max_len``] (the share at the cap are the
truncated answers); prompt lengths are uniform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    rows: int = 64  # sequences one engine decodes in a rollout (prompts x group size)
    median: int = 1500
    sigma: float = 1.0
    max_len: int = 8192
    min_len: int = 32
    prompt_min: int = 128
    prompt_max: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.median <= self.max_len:
            raise ValueError(f"lengths: need 1 <= min_len <= median <= max_len, got {self.min_len}, "
                             f"{self.median}, {self.max_len}")
        if self.rows < 1 or self.sigma < 0 or not 1 <= self.prompt_min <= self.prompt_max:
            raise ValueError(f"workload: bad rows {self.rows}, sigma {self.sigma} or prompt range "
                             f"{self.prompt_min}-{self.prompt_max}")

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(prompt lengths, response lengths) of one rollout, as int arrays of ``rows``."""
        prompts = rng.integers(self.prompt_min, self.prompt_max + 1, self.rows)
        lengths = np.exp(np.log(self.median) + self.sigma * rng.standard_normal(self.rows))
        return prompts, np.clip(np.round(lengths), self.min_len, self.max_len).astype(np.int64)
