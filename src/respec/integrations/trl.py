"""ReSpec as TRL's rollout backend: ``GRPOTrainer(..., rollout_func=RespecRollout(...))``.

TRL hands its rollout function the prompts of a step, each repeated ``num_generations`` times in a
row, and the trainer; it wants back, for every prompt it handed over, the prompt's token ids, the
completion's and each sampled token's logprob. ``RespecRollout`` generates them with ReSpec's engine:
one prefill per distinct prompt with ``n`` samples, exact speculative decoding (a fixed k or the
adaptive controller, with any ReSpec drafter), and logprobs of the sampling distribution (the logits
over the trainer's temperature, as TRL recomputes them).

TRL does not sync weights into a custom backend: before each rollout the engine checks
``trainer.state.global_step`` against the step its weights come from and, when the trainer moved on,
copies the policy's parameters into its own model in place. The drafters stay attached to that model
(nothing to reload, nothing lost), and a policy that no longer fits the engine (another vocabulary,
width or depth, which would leave the drafter trained for another target) is refused.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from ..engine.llm import LLM
from ..engine.params import SamplingParams
from ..models.config import ModelConfig
from ..models.weights import hf_to_respec, load_into


class RespecRollout:
    """A ``rollout_func`` for ``trl.GRPOTrainer`` (TRL >= 1.0) that generates with ReSpec's engine.

    ``model``: what ``LLM`` takes (a preset, an HF directory, e.g. the one the trainer's model was
    loaded from); ``drafter`` / ``speculative`` as in ``LLM``. ``seed`` makes the samples of a step a
    function of (seed, step, prompt text), independent of how the prompts were batched or split across
    processes."""

    def __init__(self, model: Any = None, *, tokenizer: Any = None, drafter: Any = None, speculative: Any = None,
                 device: str | None = "cpu", dtype: str | None = None, max_num_seqs: int = 64, seed: int = 0,
                 llm: LLM | None = None) -> None:
        self.llm = llm or LLM(model, tokenizer=tokenizer, drafter=drafter, speculative=speculative, device=device,
                              dtype=dtype, max_num_seqs=max_num_seqs)
        self.seed = seed
        self.synced_step: int | None = None  # the trainer step whose weights the engine holds (None: as loaded)
        self.weight_version = 0  # weight syncs so far
        self.last_stats: dict[str, float] = {}
        self._drafter_seen: dict[str, tuple[int, int]] = {}  # name -> (drafter version, trainer step it appeared)

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        self.sync(trainer)
        groups = _runs(prompts)
        encoded = [self.llm.encode(prompt, chat=_is_chat(prompt)) for prompt, _ in groups]
        step = int(trainer.state.global_step)
        params = [self._params(trainer, count, _seed(self.seed, step, prompt, repeat))
                  for prompt, count, repeat in _repeats(groups)]
        outputs = self.llm.generate(encoded, params, progress=False)
        samples = [(output.prompt_token_ids, sample) for output in outputs for sample in output.samples]
        self.last_stats = self._stats()
        return {"prompt_ids": [list(ids) for ids, _ in samples],
                "completion_ids": [list(sample.token_ids) for _, sample in samples],
                "logprobs": [list(sample.logprobs) for _, sample in samples]}

    @staticmethod
    def _params(trainer: Any, count: int, seed: int) -> SamplingParams:
        return SamplingParams(n=count, temperature=float(trainer.temperature), top_p=float(trainer.top_p or 1.0),
                              top_k=int(trainer.top_k or 0), max_new_tokens=int(trainer.max_completion_length),
                              seed=seed)

    # ------------------------------------------------------------------ weights
    def sync(self, trainer: Any) -> bool:
        """Copy the policy's weights into the engine if the trainer has stepped since the last copy;
        True when it copied."""
        step = int(trainer.state.global_step)
        if step == self.synced_step:
            return False
        policy = trainer.accelerator.unwrap_model(trainer.model)
        self.load_policy(policy)
        self.synced_step = step
        return True

    @torch.no_grad()
    def load_policy(self, policy: torch.nn.Module) -> None:
        """The weights of a transformers causal LM, copied into the engine's model in place."""
        engine = self.llm.model.config
        theirs = ModelConfig.from_hf(policy.config.to_dict())
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(theirs, name) != getattr(engine, name):
                raise ValueError(f"sync: the trainer's model has {name} {getattr(theirs, name)}, this engine (and "
                                 f"its drafters) {getattr(engine, name)}; a drafter for one target cannot draft for "
                                 f"the other")
        state = hf_to_respec(engine, dict(policy.state_dict()), "the trainer's model")
        load_into(self.llm.model, {k: v.to(self.llm.model.dtype) for k, v in state.items()}, "the trainer's model")
        self.weight_version += 1

    def _stats(self) -> dict[str, float]:
        """The rollout's speculative figures and, per drafter, its version and ``target_version_gap``: the
        trainer steps since that drafter version first drafted (how far the policy moved past it)."""
        spec = self.llm.stats.spec
        step = self.synced_step or 0
        out = {"respec/weight_version": float(self.weight_version), "respec/accept_len": spec.accept_len}
        for name, drafter in self.llm.drafters.items():
            version, since = self._drafter_seen.get(name, (None, step))
            if version != drafter.version:
                version, since = drafter.version, step
                self._drafter_seen[name] = (version, since)
            out[f"respec/drafter_version/{name}"] = float(version)
            out[f"respec/target_version_gap/{name}"] = float(step - since)
        return out


def _runs(prompts: list) -> list[tuple[Any, int]]:
    """Consecutive equal prompts as (prompt, count): TRL repeats each prompt ``num_generations`` times."""
    runs: list[tuple[Any, int]] = []
    for prompt in prompts:
        if runs and runs[-1][0] == prompt:
            runs[-1] = (prompt, runs[-1][1] + 1)
        else:
            runs.append((prompt, 1))
    return runs


def _repeats(groups: list[tuple[Any, int]]):
    """(prompt, count, how many earlier groups of this step had the same prompt)."""
    seen: dict[str, int] = {}
    for prompt, count in groups:
        key = repr(prompt)
        yield prompt, count, seen.get(key, 0)
        seen[key] = seen.get(key, 0) + 1


def _seed(seed: int, step: int, prompt: Any, repeat: int) -> int:
    """A sampling seed from the prompt's content: the same prompt gets the same samples wherever it is served."""
    return zlib.crc32(f"{seed}/{step}/{repeat}/{prompt!r}".encode())


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
