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
    function of (seed, step, process, prompt text), independent of how a process's prompts were batched;
    processes that each hold part of one prompt's group draw different samples."""

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
        encoded = encode_prompts([prompt for prompt, _ in groups], trainer, self.llm)
        step, rank = int(trainer.state.global_step), int(getattr(trainer.accelerator, "process_index", 0))
        settings = sampling_settings(trainer)
        params = [SamplingParams(n=count, seed=_seed(self.seed, step, rank, prompt, repeat), **settings)
                  for prompt, count, repeat in _repeats(groups)]
        before = (self.llm.stats.spec.emitted, self.llm.stats.spec.verify_steps)
        outputs = self.llm.generate(encoded, params, progress=False)
        samples = [(output.prompt_token_ids, sample) for output in outputs for sample in output.samples]
        self.last_stats = self._stats(before)
        return {"prompt_ids": [list(ids) for ids, _ in samples],
                "completion_ids": [list(sample.token_ids) for _, sample in samples],
                "logprobs": [list(sample.logprobs) for _, sample in samples]}

    # ------------------------------------------------------------------ weights
    def sync(self, trainer: Any) -> bool:
        """Copy the policy's weights into the engine if the trainer has stepped since the last copy;
        True when it copied."""
        step = int(trainer.state.global_step)
        if step == self.synced_step:
            return False
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(policy, "peft_config") or hasattr(policy, "merge_and_unload"):
            raise ValueError("sync: the trainer's model is a PEFT model; RespecRollout copies whole weights, so "
                             "train without peft_config (adapters are not supported yet)")
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

    def _stats(self, before: tuple[int, int]) -> dict[str, float]:
        """This rollout's acceptance length and, per drafter, its version and ``target_version_gap``: the
        trainer steps since the engine received that drafter version (how far the policy moved past it)."""
        spec = self.llm.stats.spec
        steps = spec.verify_steps - before[1]
        step = self.synced_step or 0
        out = {"respec/weight_version": float(self.weight_version),
               "respec/accept_len": (spec.emitted - before[0]) / steps if steps else 0.0}
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


def encode_prompts(prompts: list, trainer: Any, llm: LLM) -> list[list[int]]:
    """Token ids of the prompts as TRL itself builds them: the trainer's processing class with its chat
    template, template kwargs and tools for conversations, plain tokenization for text; the engine's
    tokenizer when the trainer has none."""
    tokenizer = getattr(trainer, "processing_class", None)
    if tokenizer is None:
        return [llm.encode(prompt, chat=_is_chat(prompt)) for prompt in prompts]
    if _is_chat(prompts[0]):
        tokenized = tokenizer.apply_chat_template(
            conversation=prompts, tools=getattr(trainer, "tools", None) or None,
            chat_template=getattr(trainer, "chat_template", None), add_generation_prompt=True, tokenize=True,
            return_dict=True, **(getattr(trainer, "chat_template_kwargs", None) or {}))
        return [list(ids) for ids in tokenized["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def sampling_settings(trainer: Any) -> dict[str, Any]:
    """The trainer's sampling settings as SamplingParams fields; settings the engine does not apply are
    refused rather than ignored (the rollouts would not follow the distribution TRL assumes)."""
    if trainer.temperature is None or trainer.temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0: greedy), got {trainer.temperature!r}")
    if trainer.max_completion_length is None:
        raise ValueError("max_completion_length: set it in GRPOConfig; the engine needs a token budget")
    unsupported = {"min_p": getattr(trainer, "min_p", None) or None,
                   "repetition_penalty": None if getattr(trainer, "repetition_penalty", 1.0) in (None, 1.0)
                   else trainer.repetition_penalty,
                   "generation_kwargs": getattr(getattr(trainer, "args", None), "generation_kwargs", None) or None}
    unsupported = {name: value for name, value in unsupported.items() if value is not None}
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not applied by ReSpec's engine (got {unsupported}); unset "
                         f"them in GRPOConfig")
    top_k = int(trainer.top_k or 0)
    stop = list(getattr(trainer, "eos_token_ids", None) or [])
    return {"temperature": float(trainer.temperature), "top_p": float(trainer.top_p or 1.0),
            "top_k": max(top_k, 0), "max_new_tokens": int(trainer.max_completion_length), "stop_token_ids": stop}


def _repeats(groups: list[tuple[Any, int]]):
    """(prompt, count, how many earlier groups of this step had the same prompt)."""
    seen: dict[str, int] = {}
    for prompt, count in groups:
        key = repr(prompt)
        yield prompt, count, seen.get(key, 0)
        seen[key] = seen.get(key, 0) + 1


def _seed(seed: int, step: int, rank: int, prompt: Any, repeat: int) -> int:
    """A sampling seed from the prompt's content and the process: within a process the samples do not
    depend on how the prompts were batched; processes that share a prompt's group draw different ones."""
    return zlib.crc32(f"{seed}/{step}/{rank}/{repeat}/{prompt!r}".encode())


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
