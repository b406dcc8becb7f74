"""The demo's choices and summary lines (the demo itself runs end to end in test_trainer.py)."""

from __future__ import annotations

from respec.rl.demo import drafter_lines, drafter_overrides


def test_the_demo_reports_each_drafter_version_and_the_learners_publications():
    by_version = {"eagle@v0": [10, 40, 10, 20], "ngram@v0": [4, 16, 0, 4], "eagle@v2": [10, 40, 20, 30]}
    rows = [{"step": 1, "drafter/published": 1.0, "drafter/target_version_gap": 1.0},
            {"step": 2, "drafter/published": 2.0, "drafter/target_version_gap": 0.0}]
    lines = drafter_lines(by_version, rows)
    assert lines[0].startswith("eagle acceptance:") and "v0 2.00 v2 3.00" in lines[0]
    assert lines[1].startswith("ngram acceptance:") and "v0 1.00" in lines[1]
    assert lines[2] == ("online learner:       2 head versions published, drafting lagged the actor by 1 steps "
                        "at most")
    assert drafter_lines({}, [{"step": 1}]) == []


def test_the_demo_runs_the_full_system_where_a_head_ships_and_respects_the_users_choices():
    full = drafter_overrides("smollm2-135m", [])
    assert full == ["rollout.drafters=[smollm2-135m-eagle3, ngram]", "learner.mode=async",
                    "learner.drafter=smollm2-135m-eagle3"]
    assert drafter_overrides("SmolLM2", []) == full  # an alias of the preset
    assert drafter_overrides("/some/other/model", []) == ["rollout.drafters=[ngram]"]
    assert drafter_overrides("smollm2-135m", ["rollout.speculative=off"]) == ["rollout.drafters=[ngram]"]
    assert drafter_overrides("smollm2-135m", ["rollout.drafters=[ngram]"]) == ["rollout.drafters=[ngram]"]
