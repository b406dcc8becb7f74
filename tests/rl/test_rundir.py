"""The run directory never loses or mixes data: an owned, locked, versioned out_dir; checkpoints checked
before they count as complete; resumes that fall back past damage; nothing non-finite saved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from respec.rl.checkpoint import (
    MARKER,
    complete_checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from respec.rl.metrics import read_metrics
from respec.rl.rundir import RunDirectory
from respec.rl.trainer import Trainer
from tests.helpers import char_class_reward, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def trainer(model, out_dir, *overrides: str, **options) -> Trainer:
    return Trainer(tiny_config(model, out_dir, *overrides), reward_fn=char_class_reward, **options)


def run(model, out_dir, *overrides: str, **options) -> Trainer:
    t = trainer(model, out_dir, *overrides, **options)
    t.train(progress=False)
    return t


def checksums(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != ".lock"}


def test_a_new_run_refuses_a_directory_that_holds_a_run_and_overwrite_moves_it_aside(tiny_llama, tmp_path):
    out = tmp_path / "run"
    run(tiny_llama, out, "steps=2", "checkpoint_every=1")
    before = checksums(out)
    with pytest.raises(ValueError, match=r"^out_dir: .* holds another run .*--resume.*--overwrite"):
        trainer(tiny_llama, out, "steps=1", "keep_last=1", "seed=7")
    assert checksums(out) == before  # refused before anything was written
    replaced = run(tiny_llama, out, "steps=1", "seed=7", overwrite=True)
    assert replaced.directory.moved_aside == tmp_path / "run.replaced-1"
    assert checksums(tmp_path / "run.replaced-1") == before  # the old run, whole, beside the new one
    assert [p.name for p in complete_checkpoints(out)] == ["step-000001"]
    assert [row["step"] for row in read_metrics(out)] == [1]
    assert json.loads((out / "run.json").read_text())["seed"] == 7


HOLDER = textwrap.dedent("""
    import sys, time
    from respec.rl.rundir import RunDirectory
    held = RunDirectory(sys.argv[1]).open({"seed": 0})
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_writer_fails_at_once_naming_the_holder(tiny_llama, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        with pytest.raises(ValueError, match=rf"^out_dir: .* is in use by process {holder.pid} "):
            trainer(tiny_llama, out)
        assert time.perf_counter() - started < 2.0
    finally:
        holder.kill()
        holder.wait()
    run(tiny_llama, out, "steps=1", overwrite=True).close()  # the lock went with its process


def test_the_lock_is_released_when_the_run_ends(tiny_llama, tmp_path):
    first = run(tiny_llama, tmp_path, "steps=1")
    RunDirectory(tmp_path).open({}, resume=True, allow_config_change=True).close()
    assert first.directory._lock_file is None


def test_resume_checks_the_config_and_records_an_allowed_change(tiny_llama, tmp_path):
    run(tiny_llama, tmp_path, "steps=1")
    with pytest.raises(ValueError, match=r"^resume: the config differs .* rollout.temperature \(1.0 -> 0.5\)"):
        trainer(tiny_llama, tmp_path, "steps=2", "rollout.temperature=0.5", resume=True)
    trainer(tiny_llama, tmp_path, "steps=2", "eval_every=1", resume=True).close()  # steps and logging: free
    resumed = trainer(tiny_llama, tmp_path, "steps=2", "rollout.temperature=0.5", resume=True,
                      allow_config_change=True)
    resumed.close()
    resumes = json.loads((tmp_path / "run.json").read_text())["resumes"]
    assert resumes[-1]["config_changes"] == ["rollout.temperature (1.0 -> 0.5)"]


def test_resume_with_no_steps_left_is_refused_and_rewrites_nothing(tiny_llama, tmp_path):
    run(tiny_llama, tmp_path, "steps=2")
    before = checksums(tmp_path)
    for steps in (1, 2):
        with pytest.raises(ValueError, match=rf"^steps: {steps}, but the checkpoint .* has run 2 steps"):
            trainer(tiny_llama, tmp_path, f"steps={steps}", resume=True)
    assert {k: v for k, v in checksums(tmp_path).items() if k != "run.json"} == \
        {k: v for k, v in before.items() if k != "run.json"}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tiny_llama, tmp_path, damage):
    run(tiny_llama, tmp_path, "steps=2", "checkpoint_every=1")
    state = tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    else:
        state.unlink()
    with pytest.warns(RuntimeWarning, match="step-000002 is damaged"):
        assert latest_checkpoint(tmp_path).name == "step-000001"
    with pytest.warns(RuntimeWarning, match="damaged"):
        resumed = trainer(tiny_llama, tmp_path, "steps=3", resume=True)
    assert resumed.step == 1
    resumed.close()
    with pytest.raises(ValueError, match=r"^resume_from: checkpoint .*step-000002 is damaged"):
        trainer(tiny_llama, tmp_path, "steps=3", resume_from=2)
    with pytest.raises(ValueError, match=r"^resume_from: no complete checkpoint of step 5 .*\[1, 2\]"):
        trainer(tiny_llama, tmp_path, "steps=9", resume_from=5)
    picked = trainer(tiny_llama, tmp_path, "steps=3", resume_from=1)
    assert picked.step == 1
    picked.close()


def test_a_checkpoint_lists_its_files_and_sizes(tiny_llama, tmp_path):
    run(tiny_llama, tmp_path, "steps=1")
    path = complete_checkpoints(tmp_path)[-1]
    files = json.loads((path / MARKER).read_text())["files"]
    assert {"actor/model.safetensors", "actor/config.json", "trainer_state.pt"} <= set(files)
    assert all((path / name).stat().st_size == size for name, size in files.items())


def test_non_finite_weights_are_never_saved(tiny_llama, tmp_path):
    t = run(tiny_llama, tmp_path, "steps=1")
    with torch.no_grad():
        t.actor.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="step 1 not saved, the actor's norm.weight holds NaN"):
        save_checkpoint(tmp_path, 1, t.actor, {})
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001"]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # no staging left behind


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    """Weights that blow up in step 2 (as a learning rate too large makes them) give a NaN loss: the step
    is not applied, the run stops naming it and the likely cause, and step 1's checkpoint stays newest."""
    t = trainer(tiny_llama, tmp_path, "steps=4", "checkpoint_every=1")

    def diverging_reward(texts, gold):
        if t.step == 1:
            with torch.no_grad():
                t.actor.layers[0].mlp.down_proj.weight.mul_(float("inf"))
        return char_class_reward(texts, gold)

    t.reward_fn = diverging_reward
    with pytest.raises(ValueError, match=r"^step 2: the loss \(nan\) .* not finite.*optim.lr = 0.01"):
        t.train(progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001"]
    assert t.directory._lock_file is None  # the run closed on its way out


def test_a_non_finite_reward_stops_the_run_naming_step_and_sample(tiny_llama, tmp_path):
    t = trainer(tiny_llama, tmp_path, "steps=2")
    t.reward_fn = lambda texts, gold: [float("inf")] + [0.5] * (len(texts) - 1)
    with pytest.raises(ValueError, match=r"^step 1: the reward of sample 0 is inf"):
        t.train(progress=False)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_repaired_on_resume(tiny_llama, tmp_path):
    run(tiny_llama, tmp_path, "steps=2")
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "train/rew')  # killed while writing step 3
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl line 3 is torn"):
        assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    with pytest.warns(RuntimeWarning, match="line 3 is torn"):
        trainer(tiny_llama, tmp_path, "steps=3", resume=True).close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON object"):
        read_metrics(tmp_path)
