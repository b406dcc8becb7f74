"""The online drafter (TESTING.md section C): overfitting a batch (18), held-out acceptance rising with
updates (19), hot-swaps mid-generation that keep greedy output and the T > 0 distribution (20), atomic
publication (21); plus the buffer, the trigger policy, crash isolation and the trainer wiring."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from respec import LLM, SamplingParams
from respec.engine import Engine, Request
from respec.engine.drafters import EagleDrafter
from respec.engine.snapshots import (
    DirectorySource,
    Mailbox,
    load_latest,
    make_snapshot,
    save_snapshot,
)
from respec.learner.buffer import SampleBuffer, capture_micro_batch, collate
from respec.learner.config import LearnerConfig
from respec.learner.distill import ttt_forward
from respec.learner.online import OnlineLearner
from respec.learner.worker import LearnerWorker, TriggerPolicy
from respec.models.eagle import EagleHead
from respec.models.eagle_format import save_eagle_head
from respec.rl.config import load_config
from respec.rl.trainer import Trainer
from tests.helpers import (
    DISTRIBUTION_P_LIMIT,
    N_SAMPLES,
    SMALL_VOCAB,
    ar_samples,
    cells,
    char_class_reward,
    prompts_for,
    random_head,
    tiny_config,
    two_sample_p_value,
)


def learner_for(llm: LLM, head: EagleHead, **overrides) -> OnlineLearner:
    settings = {"mode": "sync", "weighting": "none", "batch_size": 4, "lr": 3e-3, "min_buffer_tokens": 1,
                **overrides}
    drafter = EagleDrafter(head, llm.model)
    return OnlineLearner(drafter, LearnerConfig(**settings), depths=3, temperature=1.0)


def fill_buffer(learner: OnlineLearner, model, sequences: list[list[int]], prompt_len: int,
                rewards: list[float] | None = None, step: int = 0) -> None:
    """What the GRPO update hands the learner: one training forward, captured."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        out = model(ids, capture_layers=learner.fuse_layers)
        predict_at = (prompt_len - 1 + torch.arange(width - prompt_len)).clamp(max=width - 1)
        logits = model.logits(out.hidden[:, predict_at])
    rewards = rewards or [1.0] * len(sequences)
    learner.capture(ids, [len(s) for s in sequences], [prompt_len] * len(sequences), out.captured, logits,
                    rewards, [0.0] * len(sequences), step)


def sampled_sequences(llm: LLM, count: int, seed: int, new_tokens: int = 24) -> tuple[list[list[int]], int]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 90, size=6).tolist() for _ in range(count)]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True,
                                                seed=seed), progress=False)
    return [p + o.samples[0].token_ids for p, o in zip(prompts, outs)], 6


# ---------------------------------------------------------------------- 18. overfit a batch
@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 8])
def test_learner_overfits_a_fixed_batch(target_llm, top_k):
    learner = learner_for(target_llm, random_head(target_llm.model, seed=1), logits_top_k=top_k,
                          updates_per_round=50)
    sequences, prompt_len = sampled_sequences(target_llm, 4, seed=0)
    fill_buffer(learner, target_llm.model, sequences, prompt_len)
    samples = learner.buffer.snapshot()
    target = learner.frozen_target(target_llm.model)
    first = ttt_forward(learner.head, target, collate(samples, None, target.device, target.dtype), 3).loss.item()
    result = learner.train_round(target)
    last = ttt_forward(learner.head, target, collate(samples, None, target.device, target.dtype), 3).loss.item()
    assert result.updates == 50 and result.version == 1
    assert last <= 0.5 * first, (first, last)


def test_top_k_with_every_token_equals_the_dense_loss(target_llm):
    head = random_head(target_llm.model, seed=2)
    sequences, prompt_len = sampled_sequences(target_llm, 3, seed=1, new_tokens=10)
    vocab = target_llm.model.config.vocab_size
    dense, sparse = learner_for(target_llm, head), learner_for(target_llm, head, logits_top_k=vocab - 1)
    for learner in (dense, sparse):
        fill_buffer(learner, target_llm.model, sequences, prompt_len)
    assert sparse.buffer.snapshot()[0].target.shape[-1] == vocab - 1
    target = dense.frozen_target(target_llm.model)
    losses = [ttt_forward(head, target, collate(l.buffer.snapshot(), None, target.device, target.dtype), 3).loss.item()
              for l in (dense, sparse)]
    # V - 1 tokens kept, the last one's mass in the "rest" bin: the same partition, the same KL (up to
    # the dense buffer's bf16 logits).
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


# ---------------------------------------------------------------------- 19. held-out acceptance improves
def engine_accept_len(llm: LLM, drafter: EagleDrafter, prompts: list[list[int]]) -> float:
    spec = LLM(llm.model, tokenizer=llm.tokenizer, drafter=drafter, speculative=3)
    spec.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True, seed=11),
                  progress=False)
    return spec.stats.spec.accept_len


@pytest.mark.slow
def test_held_out_acceptance_rises_after_updates(target_llm):
    learner = learner_for(target_llm, random_head(target_llm.model, seed=3, scale=0.05), updates_per_round=40)
    sequences, prompt_len = sampled_sequences(target_llm, 32, seed=5)
    fill_buffer(learner, target_llm.model, sequences, prompt_len)
    held_out = [np.random.default_rng(99 + i).integers(3, 90, size=6).tolist() for i in range(8)]
    before = engine_accept_len(target_llm, learner.drafter, held_out)
    for _ in range(2):
        learner.train_round(learner.frozen_target(target_llm.model))
    assert learner.drafter.swap_if_newer() and learner.drafter.version == 2
    after = engine_accept_len(target_llm, learner.drafter, held_out)
    assert after > before + 0.05, (before, after)
    assert set(LLM(target_llm.model, tokenizer=target_llm.tokenizer).stats.spec.by_version) == set()


def test_tau_sim_is_only_reported_on_samples_not_yet_trained_on(target_llm):
    """A round with no newer samples (e.g. every reward 0 since the last one) would measure the head
    on its own training data: it reports no tau_sim instead of an inflated one."""
    learner = learner_for(target_llm, random_head(target_llm.model, seed=3, scale=0.05), updates_per_round=2)
    sequences, prompt_len = sampled_sequences(target_llm, 8, seed=5)
    target = learner.frozen_target(target_llm.model)
    fill_buffer(learner, target_llm.model, sequences, prompt_len, step=1)
    assert learner.train_round(target).tau_sim_before is not None
    assert learner.train_round(target).tau_sim_before is None  # nothing new since the last round
    fill_buffer(learner, target_llm.model, sequences, prompt_len, step=2)
    assert learner.train_round(target).tau_sim_before is not None


# ---------------------------------------------------------------------- 20. hot-swap mid-generation
class SwappingSource:
    """Publishes a differently perturbed head before every decode step (the worst case of a learner
    that finishes rounds mid-rollout)."""

    def __init__(self, heads: list[EagleHead]) -> None:
        self.snapshots = [make_snapshot(h, v + 1) for v, h in enumerate(heads)]
        self.calls = 0

    @property
    def version(self) -> int:
        self.calls += 1
        return self.calls  # a new version every step

    def latest(self):
        base = self.snapshots[(self.calls - 1) % len(self.snapshots)]
        return type(base)(self.calls, base.tensors, base.digest, base.meta)


def swapping_drafter(model, seeds=(4, 5, 6)) -> EagleDrafter:
    drafter = EagleDrafter(random_head(model, seed=seeds[0], scale=0.3), model)
    drafter.subscribe(SwappingSource([random_head(model, seed=s, scale=0.3) for s in seeds]))
    return drafter


def test_swapping_weights_every_step_keeps_greedy_output(target_llm):
    prompts = [np.random.default_rng(i).integers(3, 90, size=3 + i).tolist() for i in range(5)]
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    reference = [o.samples[0].token_ids for o in target_llm.generate(prompts, params, progress=False)]
    drafter = swapping_drafter(target_llm.model)
    spec = LLM(target_llm.model, tokenizer=target_llm.tokenizer, drafter=drafter, speculative=3)
    got = [o.samples[0].token_ids for o in spec.generate(prompts, params, progress=False)]
    assert got == reference
    versions = spec.stats.spec.by_version
    assert len(versions) > 3 and drafter.version > 3, versions  # the weights really changed mid-generation
    assert sum(v[0] for v in versions.values()) == spec.stats.spec.verify_steps


@pytest.mark.slow
def test_swapping_weights_every_step_keeps_the_sampling_distribution(small_target):
    drafter = swapping_drafter(small_target)
    engine = Engine(small_target, max_num_seqs=10_000, drafter=drafter, speculative=1)
    prompt, rows = prompts_for(1)[0], []
    for wave in range(N_SAMPLES // 10_000):
        seqs = engine.generate([Request(prompt, SamplingParams(n=10_000, temperature=1.0, ignore_eos=True,
                                                               max_new_tokens=3, seed=7_000 + wave))])[0]
        rows.append(np.array([[0, *s.token_ids] for s in seqs], dtype=np.int64))
    samples = torch.from_numpy(np.concatenate(rows))
    assert drafter.version > 2 and 0.05 < engine.stats.spec.accept_rate < 0.95
    p_value = two_sample_p_value(cells(samples, slice(1, 4)), cells(ar_samples(small_target, 1.0, 1), slice(1, 4)))
    assert p_value > DISTRIBUTION_P_LIMIT
    assert SMALL_VOCAB == small_target.config.vocab_size


# ---------------------------------------------------------------------- 21. atomic publication
def test_directory_publication_rejects_half_written_and_corrupt_snapshots(target_llm, tmp_path):
    model = target_llm.model
    good = make_snapshot(random_head(model, seed=7), 1)
    save_snapshot(tmp_path, good)
    drafter = EagleDrafter(random_head(model, seed=8), model)
    drafter.subscribe(DirectorySource(tmp_path, poll_s=0))
    assert drafter.swap_if_newer() and drafter.version == 1
    assert torch.equal(drafter.head.fc.weight, good.tensors["fc.weight"])

    # v2: half-written (a staging directory that never got renamed, and a directory without manifest)
    (tmp_path / ".v000002.tmp").mkdir()
    half = tmp_path / "v000002"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 100)
    assert not drafter.swap_if_newer() and drafter.version == 1
    shutil.rmtree(half)
    # v3: complete but corrupt (bytes flipped after the digest was taken)
    path = save_snapshot(tmp_path, make_snapshot(random_head(model, seed=9), 3))
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    assert not drafter.swap_if_newer() and drafter.version == 1
    assert torch.equal(drafter.head.fc.weight, good.tensors["fc.weight"])
    assert any("digest" in r for r in drafter.source.rejected)
    snapshot, _ = load_latest(tmp_path)
    assert snapshot.version == 1
    # v4: sound again, and taken
    save_snapshot(tmp_path, make_snapshot(random_head(model, seed=10), 4))
    assert drafter.swap_if_newer() and drafter.version == 4


def test_in_memory_publication_checks_digest_shapes_and_order(target_llm):
    model = target_llm.model
    drafter = EagleDrafter(random_head(model, seed=1), model)
    mailbox = Mailbox()
    drafter.subscribe(mailbox)
    before = drafter.head.fc.weight.clone()
    snapshot = make_snapshot(random_head(model, seed=2), 1)
    snapshot.tensors["fc.weight"].add_(1.0)  # corrupted after publication's digest
    mailbox.publish(snapshot)
    assert not drafter.swap_if_newer() and "digest" in drafter.swap_errors[-1]
    assert torch.equal(drafter.head.fc.weight, before)
    wrong = random_head(model, draft_vocab_size=16, seed=3)
    mailbox.publish(make_snapshot(wrong, 2))
    assert not drafter.swap_if_newer() and "expected" in drafter.swap_errors[-1]
    with pytest.raises(ValueError, match="not newer"):
        mailbox.publish(make_snapshot(random_head(model, seed=4), 2))
    mailbox.publish(make_snapshot(random_head(model, seed=4), 3))
    assert drafter.swap_if_newer() and drafter.version == 3


# ---------------------------------------------------------------------- buffer, trigger, worker
def test_buffer_is_bounded_in_tokens_and_evicts_oldest():
    buffer = SampleBuffer(max_tokens=50)

    def sample(step: int, length: int):
        return capture_micro_batch(torch.arange(length)[None], [length], [4], {0: torch.zeros(1, length, 2)},
                                   torch.zeros(1, length - 4, 6), (0,), None, [1.0], [0.0], step, 1.0)

    for step in range(6):
        buffer.add(sample(step, 20))
    assert buffer.num_tokens <= 50 and [s.step for s in buffer.snapshot()] == [4, 5]
    assert buffer.evicted == 4 and buffer.added == 6
    assert sample(0, 5) == []  # a one-token response teaches nothing


def test_trigger_policy_fires_on_a_drop_below_the_post_update_level():
    policy = TriggerPolicy(drop=0.1)
    assert not policy.due(2.0, 0)  # sets the level
    assert not policy.due(1.85, 0) and not policy.due(None, 0)
    assert policy.due(1.79, 0)
    policy.updated(1)
    assert not policy.due(1.0, 0) and not policy.due(1.0, None)  # drafted by v0, or swapped mid-rollout
    assert not policy.due(1.5, 1)  # the first rollout wholly drafted by v1 sets the new level
    assert not policy.due(1.4, 1) and policy.due(1.3, 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_worker_publishes_and_a_failing_learner_never_stops_rollouts(target_llm, mode):
    learner = learner_for(target_llm, random_head(target_llm.model, seed=4), mode=mode, updates_per_round=2)
    sequences, prompt_len = sampled_sequences(target_llm, 4, seed=2)
    fill_buffer(learner, target_llm.model, sequences, prompt_len)
    worker = LearnerWorker(learner, learner.config)
    worker.after_update(target_llm.model, 0, None)
    worker.wait_idle()
    assert learner.version == 1 and worker.error is None
    assert learner.drafter.swap_if_newer() and learner.drafter.version == 1
    metrics = worker.metrics(1)
    assert metrics["drafter/version"] == 1 and metrics["drafter/target_version_gap"] == 1 and "drafter/kd_loss" in metrics

    def broken(*args, **kwargs):
        raise RuntimeError("learner exploded")

    learner.head.fc.forward = broken
    with pytest.warns(RuntimeWarning, match="learner failed"):  # noqa: PT031 -- async: the warning comes on wait
        worker.after_update(target_llm.model, 1, None)
        worker.wait_idle()
    assert "learner exploded" in worker.error and worker.metrics(2)["drafter/error"] == 1.0
    spec = LLM(target_llm.model, tokenizer=target_llm.tokenizer, drafter=learner.drafter, speculative=2)
    outs = spec.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True), progress=False)
    assert len(outs[0].samples[0].token_ids) == 8 and learner.drafter.version == 1
    worker.after_update(target_llm.model, 2, None)  # a failed worker takes no more rounds
    worker.close()
    assert learner.version == 1


# ---------------------------------------------------------------------- the trainer wiring
@pytest.fixture(scope="module")
def head_dir(tiny_llama, tmp_path_factory):
    model = LLM(str(tiny_llama), device="cpu").model
    return save_eagle_head(random_head(model, seed=5, scale=0.1), tmp_path_factory.mktemp("head") / "eagle", model)


def learner_trainer(tiny_llama, head_dir, out_dir, *overrides, resume: bool = False) -> Trainer:
    config = tiny_config(tiny_llama, out_dir, "rollout.speculative=2", f"rollout.drafters=[{head_dir}]",
                         "rollout.max_new_tokens=12", "learner.mode=sync", "learner.weighting=none",
                         "learner.min_buffer_tokens=1", "learner.updates_per_round=2", "learner.batch_size=4",
                         *overrides)
    return Trainer(config, resume=resume, reward_fn=char_class_reward)


def test_trainer_trains_publishes_and_resumes_the_drafter_exactly(tiny_llama, head_dir, tmp_path):
    straight = learner_trainer(tiny_llama, head_dir, tmp_path / "a", "steps=3")
    rows = [straight.train_step() for _ in range(3)]
    assert [r["drafter/published"] for r in rows] == [1, 2, 3]
    # Each round's weights are swapped in during the next rollout.
    assert [r["drafter/version"] for r in rows] == [0, 1, 2]
    assert rows[-1]["drafter/updates"] == 6 and "drafter/acc_step_1" in rows[-1] and "ledger/drafter_train_s" in rows[-1]
    assert straight.learner.buffer.num_tokens > 0

    first = learner_trainer(tiny_llama, head_dir, tmp_path / "b", "steps=2")
    first.train(progress=False)
    resumed = learner_trainer(tiny_llama, head_dir, tmp_path / "b", "steps=3", resume=True)
    assert resumed.learner.version == 2 and resumed.learner.drafter.version == 2
    resumed.train(progress=False)
    for name, tensor in straight.learner.head.state_dict().items():
        assert torch.equal(tensor, resumed.learner.head.state_dict()[name]), name
    for name, p in straight.actor.named_parameters():
        assert torch.equal(p, dict(resumed.actor.named_parameters())[name]), name
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["drafter/published"] for r in logged if "drafter/published" in r] == [1, 2, 3]


def test_capture_skipped_rows_adds_all_correct_groups(tiny_llama, head_dir, tmp_path):
    def always_right(texts, gold):  # zero advantage everywhere: the update skips every row
        return [1.0] * len(texts)

    plain = Trainer(tiny_config(tiny_llama, tmp_path / "p", "rollout.speculative=4", f"rollout.drafters=[{head_dir}]",
                                "learner.mode=sync"), reward_fn=always_right)
    plain.train_step()
    assert plain.learner.buffer.num_tokens == 0
    extra = Trainer(tiny_config(tiny_llama, tmp_path / "e", "rollout.speculative=4", f"rollout.drafters=[{head_dir}]",
                                "learner.mode=sync", "learner.capture_skipped_rows=true"), reward_fn=always_right)
    extra.train_step()
    assert len(extra.learner.buffer) == 8


@pytest.mark.parametrize("override, field", [
    ("learner.mode=sometimes", "learner.mode"), ("learner.weighting=squared", "learner.weighting"),
    ("learner.loss=l2", "learner.loss"), ("learner.every=0", "learner.every"),
    ("learner.trigger_drop=1.5", "learner.trigger_drop"), ("learner.drafter=other", "learner.drafter"),
])
def test_bad_learner_settings_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, ["rollout.speculative=adaptive", "rollout.drafters=[ngram]", "learner.mode=sync", override])


def test_learner_needs_speculation_and_an_eagle_head(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="learner.mode"):
        load_config(None, ["rollout.speculative=off", "learner.mode=async"])
    with pytest.raises(ValueError, match="EAGLE"):
        Trainer(tiny_config(tiny_llama, tmp_path, "rollout.speculative=4", "rollout.drafters=[ngram]",
                            "learner.mode=sync"), reward_fn=char_class_reward)


def test_offline_training_prompts_follow_the_rl_task():
    """``drafter train --task`` drafts on the trainer's own phrasing (instruction + chat messages)."""
    from respec.data.tasks import INSTRUCTION, arithmetic_problems, chat_prompt
    from respec.learner.config import OfflineConfig
    from respec.learner.offline import training_prompts

    prompts = training_prompts(OfflineConfig(task="arithmetic", levels=(1, 2), num_prompts=5, seed=3))
    assert prompts == [chat_prompt(p) for p in arithmetic_problems(5, 3, (1, 2))]
    assert all(INSTRUCTION in messages[0]["content"] for messages in prompts)
    with pytest.raises(ValueError, match="task"):
        OfflineConfig(task="chess")
