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
    assert checksums(tmp_path) == before  # run.json too: a refused resume is not recorded


@pytest.mark.parametrize("damage", ["truncate", "delete", "same size"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tiny_llama, tmp_path, damage):
    run(tiny_llama, tmp_path, "steps=2", "checkpoint_every=1")
    state = tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "delete":
        state.unlink()
    else:  # the sizes still match: only loading it shows the damage
        state.write_bytes(b"\0" * state.stat().st_size)
    if damage != "same size":
        with pytest.warns(RuntimeWarning, match="step-000002 is damaged"):
            assert latest_checkpoint(tmp_path).name == "step-000001"
        with pytest.raises(ValueError, match=r"^resume_from: checkpoint .*step-000002 is damaged"):
            trainer(tiny_llama, tmp_path, "steps=3", resume_from=2)
    with pytest.warns(RuntimeWarning, match="damaged|cannot read"):
        resumed = trainer(tiny_llama, tmp_path, "steps=3", resume=True)
    assert resumed.step == 1
    resumed.close()
    assert (tmp_path / "checkpoints" / "superseded-1" / "step-000002").is_dir()  # set aside, not deleted
    with pytest.raises(ValueError, match=r"^resume_from: no complete checkpoint of step 5 .*\[1\]"):
        trainer(tiny_llama, tmp_path, "steps=9", resume_from=5)
    picked = trainer(tiny_llama, tmp_path, "steps=3", resume_from=1)
    assert picked.step == 1
    picked.close()


def test_a_run_resumed_from_an_earlier_step_never_mixes_with_its_abandoned_future(tiny_llama, tmp_path):
    """Checkpoints 1-3, resumed from 1: the later ones are set aside, the new step 2 is kept by pruning,
    and a plain resume afterwards continues the new branch."""
    run(tiny_llama, tmp_path, "steps=3", "checkpoint_every=1", "keep_last=3")
    with pytest.warns(RuntimeWarning, match="checkpoints after it are now in .*superseded-1"):
        branch = trainer(tiny_llama, tmp_path, "steps=2", "checkpoint_every=1", "keep_last=3", resume_from=1)
    branch.train(progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "superseded-1").iterdir()) == \
        ["step-000002", "step-000003"]
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    resumes = json.loads((tmp_path / "run.json").read_text())["resumes"]
    assert [r["from_step"] for r in resumes] == [1]


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


def test_a_start_that_fails_before_training_leaves_no_run_behind(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="model"):
        trainer("/nonexistent/model", tmp_path)
    run(tiny_llama, tmp_path, "steps=1").close()  # not refused: nothing of a run was there


def test_a_config_saved_in_the_old_spelling_resumes_without_a_flag(tiny_llama, tmp_path):
    import yaml

    run(tiny_llama, tmp_path, "steps=1", "rollout.speculative=2", "rollout.drafters=[ngram]")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    saved["rollout"].update(speculative="static", k=2)
    del saved["rollout"]["controller"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = trainer(tiny_llama, tmp_path, "steps=2", "rollout.speculative=2", "rollout.drafters=[ngram]",
                      resume=True)  # the same meaning, read through today's spelling: no --allow-config-change
    assert resumed.step == 1
    resumed.close()


def test_overwrite_moves_only_the_runs_files(tiny_llama, tmp_path):
    run(tiny_llama, tmp_path / "run", "steps=1")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run(tiny_llama, tmp_path / "run", "steps=1", overwrite=True).close()
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "run.replaced-1" / "config.yaml").is_file()
    assert not (tmp_path / "run.replaced-1" / "notes.txt").exists()
