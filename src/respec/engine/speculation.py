"""What ``speculative`` means, in every place that takes it, and the adaptive controller's settings.

``speculative`` is the same in ``LLM`` and ``Engine``: ``None`` or ``"off"``, an int k (one drafter, k
drafts every step), ``"adaptive"`` or a ``ControllerConfig``; the trainer's ``rollout.speculative`` and
``respec generate --speculative`` take off, K or adaptive, the trainer with this ``ControllerConfig``
as ``rollout.controller``. ``resolve_speculative`` checks a value against the drafters given;
``controller.make_controller`` builds what it resolves to. Plain Python, so that a training config is
checked before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DRAFT_TOKENS = 32
DEFAULT_K = 4  # drafts per step when one drafter is given without ``speculative``


@dataclass(frozen=True)
class ControllerTuning:
    """The controller's constants. Each default is the one the measurements favoured
    (docs/ARCHITECTURE.md, benchmarks/controller_sim.py); change them only to study the controller."""

    prior_acceptance: float = 0.6  # per-position acceptance assumed before a drafter is measured
    # Row-steps of evidence each position's prior counts as (position i's prior is position i - 1's rate).
    prior_weight: float = 1.0
    cost_decay: float = 0.8  # per measurement: weight of the past in the cost corrections
    # Thompson draws costs too: each near arm's target time times exp(N(0, cost_spread^2 / (1 + n))),
    # n the measurements of its (batch, tokens) cell. Off has no rates to draw; without this, a few
    # slow off steps at a batch size left it priced too high there for good (a rollout's tail at
    # batch 2 ran the n-gram drafter at 0.6x AR's speed).
    cost_spread: float = 0.15
    # Thompson counts each observation this many times in the posteriors it draws from. Forgetting
    # caps the evidence at ~acceptance_memory observations, so unsharpened draws stay wide for good and
    # keep buying arms a few percent behind (5-10% of the best arm's speed at batch 1, where every arm
    # is within 10-20%). The means still forget as fast.
    thompson_sharpness: float = 4.0
    explore_margin: float = 0.25  # explore only arms whose predicted goodput is within this share of the best
    switch_horizon: int = 16  # steps a drafter's catch-up cost is spread over

    def __post_init__(self) -> None:
        for name, low, high in (("prior_acceptance", 0.0, 1.0), ("cost_decay", 0.0, 1.0)):
            value = getattr(self, name)
            if not low < value < high:
                raise ValueError(f"{name}: must be in ({low:g}, {high:g}), got {value}")
        for name in ("prior_weight", "thompson_sharpness"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.cost_spread >= 0:
            raise ValueError(f"cost_spread: must be >= 0, got {self.cost_spread}")
        if not 0 <= self.explore_margin <= 1:
            raise ValueError(f"explore_margin: must be in [0, 1], got {self.explore_margin}")
        if not isinstance(self.switch_horizon, int) or self.switch_horizon < 1:
            raise ValueError(f"switch_horizon: must be an integer >= 1, got {self.switch_horizon!r}")


@dataclass
class ControllerConfig:
    """The adaptive SD server's settings (``speculative=ControllerConfig(...)``, ``rollout.controller``)."""

    max_draft_tokens: int = 8  # arms use k in 1..max_draft_tokens (or ``k_choices``)
    k_choices: tuple[int, ...] | None = None
    allow_off: bool = True  # False: always speculate (with the best drafter and k)
    # Thompson sampling among arms near the best (False: always the arm predicted best). Epsilon-greedy
    # at 2% left the better drafter locked out after unlucky first steps in half of simulated batch-1
    # starts, Thompson in 13%, at equal or better goodput at every batch size (controller_sim.py).
    explore: bool = True
    # Observations over which each position's acceptance estimate forgets (time constant): a stale
    # drafter is priced down within a few of these. 256 gained nothing measurable and reacted too slowly.
    acceptance_memory: float = 64.0
    seed: int | None = None  # of the exploration draws; None: 0 (the trainer passes its run seed)
    profile_cache: str | None = None  # directory for the start-up profile; "" = do not cache
    tuning: ControllerTuning = field(default_factory=ControllerTuning)

    def __post_init__(self) -> None:
        if not isinstance(self.max_draft_tokens, int) or not 1 <= self.max_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"max_draft_tokens: must be an integer in [1, {MAX_DRAFT_TOKENS}], "
                             f"got {self.max_draft_tokens!r}")
        if self.k_choices is not None:
            self.k_choices = tuple(self.k_choices)
            if not self.k_choices:
                raise ValueError("k_choices: empty; give at least one k or leave it unset")
            bad = [k for k in self.k_choices if not isinstance(k, int) or not 1 <= k <= self.max_draft_tokens]
            if bad:
                raise ValueError(f"k_choices: {bad} outside [1, max_draft_tokens={self.max_draft_tokens}]")
        if not self.acceptance_memory > 0:
            raise ValueError(f"acceptance_memory: must be > 0 row-steps, got {self.acceptance_memory}")
        if not isinstance(self.explore, bool):
            raise ValueError(f"explore: must be true (Thompson sampling) or false, got {self.explore!r}")

    @property
    def ks(self) -> tuple[int, ...]:
        return self.k_choices or tuple(range(1, self.max_draft_tokens + 1))


def resolve_speculative(speculative: object, drafters: list[str]) -> int | ControllerConfig | None:
    """``speculative`` in one of its spellings -> None (off), k, or a ControllerConfig; checked against
    the drafters given (``drafters``: their names)."""
    if speculative is None:
        if len(drafters) > 1:
            raise ValueError(f"speculative: {len(drafters)} drafters need speculative='adaptive' (or a "
                             f"ControllerConfig) to choose among them")
        return DEFAULT_K if drafters else None
    if speculative == "off":
        if drafters:
            raise ValueError(f"speculative: 'off' with drafters {drafters}; drop the drafters or give k or 'adaptive'")
        return None
    if speculative == "adaptive":
        speculative = ControllerConfig()
    if isinstance(speculative, ControllerConfig):
        if not drafters:
            raise ValueError("speculative: needs a drafter (drafter='ngram', 'self:N', an EAGLE head or a model path)")
        return speculative
    if isinstance(speculative, int) and not isinstance(speculative, bool):
        if not 1 <= speculative <= MAX_DRAFT_TOKENS:
            raise ValueError(f"speculative: k must be in [1, {MAX_DRAFT_TOKENS}], got {speculative}")
        if len(drafters) != 1:
            raise ValueError(f"speculative: k = {speculative} drafts with exactly one drafter, got "
                             f"{len(drafters)} ({drafters}); use 'adaptive' to choose among several")
        return speculative
    raise ValueError(f"speculative: expected None, 'off', an int k, 'adaptive' or a ControllerConfig, "
                     f"got {speculative!r}")
