"""The training config: YAML plus overrides, every bad value refused naming its field."""

from __future__ import annotations

import pytest

from respec.rl.config import load_config


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1e-5", "optim.lrr"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.batch_size=10", "rollout.batch_size"),
    ("rollout.temperature=-0.5", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("steps=many", "steps"),
    ("rollout.speculative=sometimes", "rollout.speculative"),
    ("reward.weights={speed: 1}", "reward.weights"),
    ("task.name=chess", "task.name"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: "):
        load_config(None, ["rollout.group_size=4", override])


@pytest.mark.parametrize("overrides, field", [
    (["task.switch_at=3"], "task.switch_at"),
    (["task.switch_to.name=arithmetic"], "task.switch_at"),
    (["task.switch_at=3", "task.switch_to.name=chess"], "task.switch_to.name"),
    (["task.switch_at=3", "task.switch_to.num_eval=0"], "task.switch_to.num_eval"),
    (["task.switch_at=3", "task.switch_to.switch_at=5", "task.switch_to.switch_to.name=arithmetic"],
     "task.switch_to.switch_to"),
])
def test_bad_task_switch_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: "):
        load_config(None, overrides)


def test_task_switch_stages():
    config = load_config(None, ["task.levels=[1]", "task.switch_at=3", "task.switch_to.levels=[3]"])
    stages = [config.task.stage(step).levels for step in (1, 2, 3, 9)]
    assert stages == [[1], [1], [3], [3]]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nrollout:\n  speculative: off\n  temperature: 0.7\noptim:\n  lr: 1e-5\n")
    config = load_config(path, ["rollout.temperature=0.6", "rollout.drafters=[ngram, self:2]"])
    assert (config.steps, config.rollout.speculative, config.rollout.temperature) == (5, "off", 0.6)
    assert config.optim.lr == 1e-5 and config.rollout.drafters == ["ngram", "self:2"]
    assert load_config(None, ["rollout.group_size=4", "rollout.batch_size=32"]).rollout.prompts_per_step == 8
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, field", [
    ("rollout.speculative=0", "rollout.speculative"),
    ("rollout.speculative=fastest", "rollout.speculative"),
    ("rollout.controller.max_draft_tokens=0", "rollout.controller.max_draft_tokens"),
    ("rollout.controller.explore=maybe", "rollout.controller.explore"),
    ("rollout.controller.tuning.cost_spread=-1", "rollout.controller.tuning.cost_spread"),
    ("rollout.controller.no_such_knob=1", "rollout.controller.no_such_knob"),
])
def test_bad_speculation_settings_name_the_field(override, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: "):
        load_config(None, [override])


def test_the_rollout_speaks_the_engines_speculative_api():
    """``rollout.speculative`` takes what ``LLM(speculative=...)`` takes; adaptive embeds the engine's own
    ControllerConfig, seeded with the run's seed unless it names one."""
    static = load_config(None, ["rollout.speculative=3", "rollout.drafters=[ngram]"]).rollout
    assert static.engine_speculative(seed=5) == 3 and static.max_k == 3
    adaptive = load_config(None, ["rollout.controller.k_choices=[1,2]", "seed=5"]).rollout
    controller = adaptive.engine_speculative(seed=5)
    assert controller.k_choices == (1, 2) and controller.seed == 5 and adaptive.max_k == 2
    pinned = load_config(None, ["rollout.controller.seed=9"]).rollout
    assert pinned.engine_speculative(seed=5).seed == 9
    assert load_config(None, ["rollout.speculative=off"]).rollout.engine_speculative() == "off"
    with pytest.raises(ValueError, match="^rollout.speculative: .*exactly one drafter"):
        load_config(None, ["rollout.speculative=2", "rollout.drafters=[ngram, self:1]"])


def test_deprecated_static_and_k_still_load_with_a_warning():
    with pytest.warns(FutureWarning, match="rollout.speculative=3"):
        static = load_config(None, ["rollout.speculative=static", "rollout.k=3"]).rollout
    assert static.speculative == 3 and static.k is None
    with pytest.warns(FutureWarning, match="rollout.controller.max_draft_tokens=2"):
        adaptive = load_config(None, ["rollout.k=2"]).rollout
    assert adaptive.controller.max_draft_tokens == 2 and adaptive.max_k == 2


def test_a_saved_config_loads_back_the_same(tmp_path):
    from respec.rl.config import save_config

    config = load_config(None, ["rollout.controller.k_choices=[1,3]", "rollout.controller.tuning.switch_horizon=8"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("name", ["smollm2-arith.yaml", "smollm2-gsm8k.yaml"])
def test_the_shipped_configs_load(name, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    data = tmp_path / "gsm8k.jsonl"  # the GSM8K config reads its file (from $RESPEC_GSM8K) before any model
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(300)))
    monkeypatch.setenv("RESPEC_GSM8K", str(data))
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
    assert config.rollout.speculative == "adaptive" and config.rollout.max_k == 4
