"""The GRPO trainer on the tiny model: learning signal (23), a toy task learned (24), SD vs AR rollouts
(25), logprob parity, exact resume (27), crashes during a save (28) and whole-step commits (29)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from respec.rl import checkpoint as checkpoint_module
from respec.rl.checkpoint import complete_checkpoints, latest_checkpoint
from respec.rl.trainer import Trainer
from tests.helpers import char_class_reward, tiny_config


def make_trainer(model, out_dir, *overrides: str, resume: bool = False) -> Trainer:
    return Trainer(tiny_config(model, out_dir, *overrides), resume=resume, reward_fn=char_class_reward)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.actor.named_parameters()}


def test_no_signal_leaves_parameters_unchanged_and_signal_changes_them(tiny_llama, tmp_path):
    trainer = Trainer(tiny_config(tiny_llama, tmp_path / "zero"), reward_fn=lambda texts, gold: [1.0] * len(texts))
    before = weights(trainer)
    metrics = trainer.train_step()
    assert metrics["train/rows_updated"] == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.actor.named_parameters())

    trainer = make_trainer(tiny_llama, tmp_path / "signal")
    before = weights(trainer)
    metrics = trainer.train_step()
    assert metrics["train/rows_updated"] > 0
    unchanged = [n for n, p in trainer.actor.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, unchanged


@pytest.mark.parametrize("speculative", ["off", "adaptive"])
def test_rollout_logprobs_equal_the_trainers_recompute(tiny_llama, tmp_path, speculative):
    trainer = make_trainer(tiny_llama, tmp_path, f"rollout.speculative={speculative}",
                           "rollout.drafters=[ngram, self:1]", "rollout.max_new_tokens=24", "optim.lr=1e-3")
    metrics = [trainer.train_step() for _ in range(3)]
    updated = [m for m in metrics if m["train/rows_updated"] > 0]
    assert updated
    assert max(m["train/logprob_diff_mean"] for m in updated) <= 1e-5
    assert max(m["train/logprob_diff_max"] for m in updated) <= 1e-4
    if speculative == "adaptive":
        assert any(m.get("sd/accept_len", 0) > 1 for m in metrics)


def reward_curve(model, out_dir, seed: int, speculative: str, steps: int = 24) -> list[float]:
    trainer = make_trainer(model, out_dir, f"seed={seed}", f"steps={steps}", f"rollout.speculative={speculative}",
                           "rollout.drafters=[self:1]")
    trainer.train(progress=False)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/reward"] for r in rows if "train/reward" in r]


@pytest.mark.slow
def test_toy_task_is_learned_and_sd_rollouts_learn_like_ar(tiny_llama, tmp_path):
    """24: the last 8 steps' mean reward beats the first 8 by >= 0.3 for 3 seeds. 25: with speculative
    rollouts (static self-draft) the final rewards fall within the AR runs' seed-to-seed spread."""
    finals = {}
    for speculative in ("off", "2"):
        finals[speculative] = []
        for seed in range(3):
            curve = reward_curve(tiny_llama, tmp_path / f"{speculative}-{seed}", seed, speculative)
            first, last = np.mean(curve[:8]), np.mean(curve[-8:])
            if speculative == "off":
                assert last >= first + 0.3, (seed, curve)
            finals[speculative].append(last)
    ar, sd = np.array(finals["off"]), np.array(finals["2"])
    spread = max(ar.max() - ar.min(), sd.max() - sd.min(), 0.05)
    assert abs(ar.mean() - sd.mean()) <= spread, finals


@pytest.mark.parametrize("speculative", ["off", "4"])
def test_resume_is_exact(tiny_llama, tmp_path, speculative):
    options = (f"rollout.speculative={speculative}", "rollout.drafters=[ngram]", "steps=3")
    straight = make_trainer(tiny_llama, tmp_path / "straight", *options)
    straight.train(progress=False)

    first = make_trainer(tiny_llama, tmp_path / "split", *options, "steps=2")
    first.train(progress=False)
    resumed = make_trainer(tiny_llama, tmp_path / "split", *options, resume=True)
    assert resumed.step == 2
    resumed.train(progress=False)
    for name, p in straight.actor.named_parameters():
        assert torch.equal(p, dict(resumed.actor.named_parameters())[name]), name
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]


def test_task_switch_changes_the_problems_and_resumes_exactly(tiny_llama, tmp_path):
    options = ("steps=3", "task.switch_at=2", "task.switch_to.levels=[3]", "task.switch_to.num_train=16")
    straight = make_trainer(tiny_llama, tmp_path / "straight", *options)
    straight.train(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["task/stage"] for r in rows if "task/stage" in r] == [0.0, 1.0, 1.0]
    assert "bags" in straight.eval_set[0].question and len(straight.train_set) == 16  # level 3, the new task

    first = make_trainer(tiny_llama, tmp_path / "split", *options, "steps=2")
    first.train(progress=False)
    resumed = make_trainer(tiny_llama, tmp_path / "split", *options, resume=True)
    assert (resumed.task, resumed.position) == (straight.config.task.switch_to, first.position)
    resumed.train(progress=False)
    for name, p in straight.actor.named_parameters():
        assert torch.equal(p, dict(resumed.actor.named_parameters())[name]), name


def test_incomplete_checkpoints_are_ignored_and_keep_last_prunes_after_saving(tiny_llama, tmp_path):
    trainer = make_trainer(tiny_llama, tmp_path, "steps=3", "checkpoint_every=1", "keep_last=2")
    trainer.train(progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # A newer step without its COMPLETE marker (a crash between parts): resume must not pick it.
    partial = tmp_path / "checkpoints" / "step-000004"
    (partial / "actor").mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step-000003"
    resumed = make_trainer(tiny_llama, tmp_path, "steps=4", resume=True)
    assert resumed.step == 3
    resumed.close()


def test_resume_without_a_checkpoint_fails_clearly(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="holds no run to resume"):
        make_trainer(tiny_llama, tmp_path, resume=True)
    make_trainer(tiny_llama, tmp_path, "steps=1", "checkpoint_every=0").close()  # config, no checkpoint
    with pytest.raises(ValueError, match="no sound complete checkpoint"):
        make_trainer(tiny_llama, tmp_path, resume=True)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from respec.rl import checkpoint
    from test_trainer import make_trainer
    real = checkpoint.save_pretrained
    def slow_save(*args, **kwargs):
        out = real(*args, **kwargs)
        print("SAVING", flush=True)
        time.sleep(60)  # killed here, after the actor is written and before the step is committed
        return out
    trainer = make_trainer({model!r}, {run!r}, "steps=2", "checkpoint_every=1", "keep_last=1")
    trainer.train_step()
    trainer.save()
    print("SAVED 1", flush=True)
    checkpoint.save_pretrained = slow_save
    trainer.train_step()
    trainer.save()
""")


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tiny_llama, tmp_path):
    run = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), model=str(tiny_llama), run=str(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    lines = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if line.startswith("SAVING"):
            break
        if not line and process.poll() is not None:
            pytest.fail(f"the script ended early: {lines} {process.stderr.read()}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert "SAVED 1\n" in lines
    assert [p.name for p in complete_checkpoints(run)] == ["step-000001"]  # keep_last=1 deleted nothing yet
    resumed = make_trainer(tiny_llama, run, "steps=2", resume=True)
    assert resumed.step == 1
    resumed.train(progress=False)
    assert latest_checkpoint(run).name == "step-000002"
    assert not list((run / "checkpoints").glob(".step-*"))  # the crashed save's staging directory is gone


def test_checkpoint_actor_opens_with_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny_llama, tmp_path, "steps=1")
    trainer.train(progress=False)
    hf = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path) / "actor")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = trainer.actor.logits(trainer.actor(ids).hidden)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert checkpoint_module.MARKER in {p.name for p in latest_checkpoint(tmp_path).iterdir()}


def test_demo_runs_end_to_end_on_the_tiny_model(tiny_llama, tmp_path, capsys):
    from respec.rl.demo import run_demo

    run_demo(str(tiny_llama), [f"out_dir={tmp_path / 'demo'}", "device=cpu", "steps=2", "task.levels=[1]",
                               "task.num_eval=4", "rollout.prompts_per_step=2", "rollout.group_size=4",
                               "rollout.max_new_tokens=8", "eval_max_new_tokens=8", "rollout.compare_ar_every=1",
                               "rollout.drafters=[ngram, self:1]", "eval_every=2"])
    printed = capsys.readouterr().out
    assert "eval accuracy:" in printed and "autoregressive" in printed and "plots and summary" in printed
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["0/2", "1/2", "2/2"]  # a line per RL step, after the first eval
    assert all(f in lines[1] for f in ("reward", "rollout", "update", "drafter", "eta")) and "eval" in lines[2]
    for name in ("reward.png", "eval_accuracy.png", "accept_len.png", "rollout_time.png", "time_split.png",
                 "summary.md"):
        assert (tmp_path / "demo" / "report" / name).is_file(), name
