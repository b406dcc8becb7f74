"""The learner's configs: the online learner (``learner`` section of a training config) and
``respec drafter train`` (offline), each checked in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.tasks import TASK_NAMES
from ..engine.speculation import MAX_DRAFT_TOKENS
from ..utils.configs import require

LEARNER_MODES = ("off", "sync", "async", "triggered")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")
REWARD_WEIGHTS = ("none", "reward", "normalized", "positive_advantage")


@dataclass
class LearnerConfig:
    """The online drafter learner (off unless ``mode`` says otherwise)."""

    mode: str = "off"  # "off", "sync", "async" (every ``every`` steps) or "triggered"
    drafter: str | None = None  # which of rollout.drafters to train (default: the first EAGLE head)
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | tv
    weighting: str = "reward"  # none | reward | normalized | positive_advantage
    weight_clip: float = 5.0  # for "normalized"
    every: int = 1  # async: one update round every I RL steps
    trigger_drop: float = 0.1  # triggered: update when accept_len falls this fraction below its post-update level
    updates_per_round: int = 8  # optimizer steps per round
    batch_size: int = 8  # sequences per optimizer step
    lr: float = 3e-4
    grad_clip: float = 1.0
    depths: int | None = None  # training-time-test unroll (default: the rollout's largest k)
    temperature: float | None = None  # distillation temperature (default: the rollout's, 1 when greedy)
    buffer_tokens: int = 32768  # bound on the sample buffer (a few recent steps), oldest samples evicted first
    logits_top_k: int = 0  # 0: keep the full (draft-vocabulary) logits; K: top-K logprobs + the rest's mass
    min_buffer_tokens: int = 256  # no round before the buffer holds this many tokens
    # Rows the GRPO update skips (zero advantage, e.g. all-correct groups) get an extra forward without
    # gradient so the learner sees them too; off keeps the learner strictly free of extra passes.
    capture_skipped_rows: bool = False
    # CPU: niceness of the async worker thread (0-19). Above 0 it yields the cores to generation and
    # the update and trains in their idle gaps, at the price of rounds that may take longer.
    worker_nice: int = 0
    # CPU: intra-op threads of the async worker (its own setting; generation keeps its threads).
    # 0 = the process's default.
    worker_threads: int = 0

    def validate(self) -> LearnerConfig:
        require(self.mode in LEARNER_MODES, "learner.mode", f"must be one of {LEARNER_MODES}, got {self.mode!r}")
        require(self.loss in DIVERGENCES, "learner.loss", f"must be one of {DIVERGENCES}, got {self.loss!r}")
        require(self.weighting in REWARD_WEIGHTS, "learner.weighting",
                 f"must be one of {REWARD_WEIGHTS}, got {self.weighting!r}")
        for name in ("every", "updates_per_round", "batch_size", "buffer_tokens"):
            require(getattr(self, name) >= 1, f"learner.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(0 < self.trigger_drop < 1, "learner.trigger_drop", f"must be in (0, 1), got {self.trigger_drop}")
        require(self.lr > 0, "learner.lr", f"must be > 0, got {self.lr}")
        require(self.grad_clip > 0, "learner.grad_clip", f"must be > 0, got {self.grad_clip}")
        require(self.weight_clip > 0, "learner.weight_clip", f"must be > 0, got {self.weight_clip}")
        require(self.logits_top_k >= 0, "learner.logits_top_k", f"must be >= 0, got {self.logits_top_k}")
        require(self.worker_threads >= 0, "learner.worker_threads", f"must be >= 0, got {self.worker_threads}")
        require(0 <= self.worker_nice <= 19, "learner.worker_nice", f"must be in [0, 19], got {self.worker_nice}")
        require(self.min_buffer_tokens >= 0, "learner.min_buffer_tokens", f"must be >= 0, got {self.min_buffer_tokens}")
        if self.depths is not None:
            require(1 <= self.depths <= MAX_DRAFT_TOKENS, "learner.depths",
                    f"must be in [1, {MAX_DRAFT_TOKENS}], got {self.depths}")
        if self.temperature is not None:
            require(self.temperature > 0, "learner.temperature", f"must be > 0, got {self.temperature}")
        return self


@dataclass
class OfflineConfig:
    model: str = "smollm2-135m"
    prompts: str | None = None  # JSONL with "question", or "arithmetic"; default: $RESPEC_GSM8K, else arithmetic
    # The RL task's training problems, phrased exactly as the trainer phrases them (its instruction
    # and chat template), so the head learns the answers the RL run will draft: "arithmetic" (of
    # ``levels``) or "gsm8k" (from ``prompts``, default the file $RESPEC_GSM8K names).
    task: str | None = None
    levels: tuple[int, ...] = (1, 2, 3)
    out: str = "drafters/smollm2-eagle"
    num_prompts: int = 256
    max_new_tokens: int = 128
    temperature: float = 0.7
    depths: int = 4  # TTT unroll = the k the head is trained for
    epochs: int = 3
    batch_size: int = 4
    lr: float = 1e-3
    draft_vocab_size: int = 4096  # 0 = the full target vocabulary
    held_out: float = 0.1
    seed: int = 0
    examples: str | None = None  # answers file: read when it exists, else written after generating
    init_from: str | None = None  # a saved head to continue training (keeps its draft vocabulary)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "depths", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0 for distillation, got {self.temperature}")
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out: must be in [0, 1), got {self.held_out}")
        if self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size: must be >= 0, got {self.draft_vocab_size}")
        if self.task is not None and self.task not in TASK_NAMES:
            raise ValueError(f"task: must be one of {TASK_NAMES}, got {self.task!r}")
