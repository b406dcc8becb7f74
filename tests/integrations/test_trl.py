"""ReSpec as TRL's rollout backend: GRPOTrainer steps with RespecRollout on the tiny model."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from respec.integrations.trl import RespecRollout, _runs

PROMPTS = ["What is 3 plus 4?", "Tom has 3 apples.", "the quick brown fox", "hello world"]


def char_reward(completions, **kwargs):
    return [sum(1 for c in text if ord(c) % 4 == 0) / max(len(text), 1) for text in completions]


def grpo_trainer(tiny_llama, tmp_path, rollout, steps: int = 2, temperature: float = 1.0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                            max_completion_length=8, max_steps=steps, learning_rate=1e-2, temperature=temperature,
                            beta=0.0, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                            bf16=False, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return trl.GRPOTrainer(model=model, reward_funcs=char_reward, args=config, train_dataset=dataset,
                           processing_class=tokenizer, rollout_func=rollout)


def engine_equals_policy(rollout: RespecRollout, trainer) -> bool:
    from respec.models.weights import hf_to_respec

    policy = trainer.accelerator.unwrap_model(trainer.model)
    theirs = hf_to_respec(rollout.llm.model.config, dict(policy.state_dict()), "policy")
    ours = dict(rollout.llm.model.named_parameters())
    return all(torch.equal(ours[name], tensor) for name, tensor in theirs.items())


def test_two_grpo_steps_run_update_the_policy_and_keep_the_engine_in_step(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    rollout = RespecRollout(str(tiny_llama), drafter="self:1", speculative=2)
    seen = []
    trainer = grpo_trainer(tiny_llama, tmp_path, lambda prompts, t: seen.append(prompts) or rollout(prompts, t))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(_runs(prompts) and all(count == 2 for _, count in _runs(prompts)) for prompts in seen)  # repeated
    assert trainer.state.global_step == 2
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert changed  # the policy learned
    assert rollout.weight_version == 2 and rollout.synced_step == 1  # synced before each step's rollout
    assert rollout.llm.stats.spec.verify_steps > 0  # and it speculated
    (name,) = rollout.llm.drafters
    assert rollout.last_stats[f"respec/drafter_version/{name}"] == 0  # nothing retrained it:
    assert rollout.last_stats[f"respec/target_version_gap/{name}"] == 1  # the policy moved one step past it
    rollout.sync(trainer)  # the trainer stepped past the last rollout: the engine catches up
    assert engine_equals_policy(rollout, trainer)
    ids = rollout(seen[-1], trainer)["prompt_ids"]
    assert ids == [list(x) for x in trainer._tokenize_prompts(seen[-1])[0]]  # the prompt ids TRL itself builds


def test_prompts_repeated_by_trl_share_one_prefill_and_come_back_in_order(tiny_llama):
    rollout = RespecRollout(str(tiny_llama))
    trainer = _FakeTrainer(rollout)
    prompts = [p for p in PROMPTS[:3] for _ in range(2)]
    out = rollout(prompts, trainer)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == 6
    encoded = [rollout.llm.encode(p) for p in PROMPTS[:3]]
    assert out["prompt_ids"] == [ids for ids in encoded for _ in range(2)]
    assert rollout.llm.stats.prompt_tokens == sum(len(ids) for ids in encoded)  # one prefill per prompt
    assert all(len(c) == len(lp) for c, lp in zip(out["completion_ids"], out["logprobs"]))
    assert _runs(["a", "a", "b", "a"]) == [("a", 2), ("b", 1), ("a", 1)]


def test_samples_do_not_depend_on_how_the_prompts_were_batched(tiny_llama):
    """A prompt gets the same samples alone or among others, first or last (as when TRL splits a step's
    prompts across processes). A stateless drafter at a fixed k: the drafts are the same each time."""
    rollout = RespecRollout(str(tiny_llama), drafter="self:1", speculative=2)
    trainer = _FakeTrainer(rollout)
    together = rollout([p for p in PROMPTS for _ in range(2)], trainer)["completion_ids"]
    alone = rollout([PROMPTS[2]] * 2, trainer)["completion_ids"]
    reversed_ = rollout([p for p in PROMPTS[::-1] for _ in range(2)], trainer)["completion_ids"]
    assert together[4:6] == alone == reversed_[2:4]
    assert together[0] != together[1] or together[2] != together[3]  # and the samples of a group differ


def test_logprobs_equal_trls_recompute(tiny_llama, tmp_path, monkeypatch):
    """The logprob of each sampled token under logits / T, as TRL recomputes it for its loss (fp32)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    rollout = RespecRollout(str(tiny_llama), drafter="ngram", speculative=3)
    trainer = grpo_trainer(tiny_llama, tmp_path, rollout, temperature=0.7)
    out = rollout([p for p in PROMPTS for _ in range(2)], trainer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    worst = 0.0
    with torch.no_grad():
        for prompt, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
            ids = torch.tensor([prompt + completion])
            logits = policy(ids).logits[0, len(prompt) - 1: -1] / 0.7
            want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            worst = max(worst, float((want - torch.tensor(logprobs)).abs().max()))
    assert worst <= 1e-4, worst


def test_speculation_on_and_off_give_the_same_greedy_completions(tiny_llama):
    plain, speculative = RespecRollout(str(tiny_llama)), RespecRollout(str(tiny_llama), drafter="self:1",
                                                                         speculative=3)
    prompts = [p for p in PROMPTS for _ in range(2)]
    a = plain(prompts, _FakeTrainer(plain, temperature=0.0))
    b = speculative(prompts, _FakeTrainer(speculative, temperature=0.0))
    assert a["completion_ids"] == b["completion_ids"] and speculative.llm.stats.spec.verify_steps > 0


def test_a_lagging_engine_is_resynced_and_a_policy_of_another_shape_refused(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    rollout = RespecRollout(str(tiny_llama), drafter="self:1", speculative=2)
    trainer = _FakeTrainer(rollout)
    trainer.model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    rollout(PROMPTS[:1], trainer)
    with torch.no_grad():
        trainer.model.model.norm.weight.mul_(2.0)  # an optimizer step the engine has not seen
    trainer.state.global_step = 1
    assert not engine_equals_policy(rollout, trainer)
    rollout(PROMPTS[:1], trainer)
    assert engine_equals_policy(rollout, trainer) and rollout.synced_step == 1
    assert not rollout.sync(trainer)  # same step: nothing to copy
    trainer.model.resize_token_embeddings(trainer.model.config.vocab_size + 8)
    trainer.state.global_step = 2
    with pytest.raises(ValueError, match="^sync: the trainer's model has vocab_size"):
        rollout(PROMPTS[:1], trainer)


def test_settings_the_engine_does_not_apply_are_refused_and_top_k_off_is_zero(tiny_llama):
    from types import SimpleNamespace

    from respec.integrations.trl import sampling_settings

    base = dict(temperature=0.7, top_p=None, top_k=-1, max_completion_length=8, min_p=None, repetition_penalty=1.0,
                args=SimpleNamespace(generation_kwargs=None), eos_token_ids=[2])
    assert sampling_settings(SimpleNamespace(**base)) == {"temperature": 0.7, "top_p": 1.0, "top_k": 0,
                                                          "max_new_tokens": 8, "stop_token_ids": [2]}
    for change, message in (({"min_p": 0.1}, "^min_p: not applied"), ({"repetition_penalty": 1.2}, "^repetition_penalty"),
                            ({"args": SimpleNamespace(generation_kwargs={"a": 1})}, "^generation_kwargs"),
                            ({"max_completion_length": None}, "^max_completion_length: set it"),
                            ({"temperature": -1.0}, "^temperature: must be >= 0")):
        with pytest.raises(ValueError, match=message):
            sampling_settings(SimpleNamespace(**{**base, **change}))
    rollout = RespecRollout(str(tiny_llama))
    trainer = _FakeTrainer(rollout)
    trainer.model = SimpleNamespace(peft_config={"default": None})
    trainer.state.global_step = 1
    with pytest.raises(ValueError, match="^sync: the trainer's model is a PEFT model"):
        rollout(PROMPTS[:1], trainer)


class _FakeTrainer:
    """What RespecRollout reads from a GRPOTrainer, without training."""

    def __init__(self, rollout: RespecRollout, temperature: float = 1.0) -> None:
        from types import SimpleNamespace

        self.temperature, self.top_p, self.top_k, self.max_completion_length = temperature, 1.0, 0, 8
        self.state = SimpleNamespace(global_step=0)
        self.accelerator = SimpleNamespace(unwrap_model=lambda model: model)
        self.model = None
        rollout.synced_step = 0  # the engine starts with the weights it was built from
