"""The per-step line of a training run: what it shows, and what it leaves out when a step lacks it."""

from __future__ import annotations

from respec.rl.progress import arm_mix, duration, step_line

METRICS = {"train/reward": 0.125, "sd/accept_len": 1.4, "sd/arm_frac/off": 0.25, "sd/arm_frac/ngram:2": 0.6,
           "sd/arm_frac/eagle:4": 0.1, "sd/arm_frac/eagle:1": 0.05, "drafter/version": 3.0,
           "timing_s/rollout": 5.94, "timing_s/update": 12.9, "timing_s/drafter": 0.04}


def test_a_full_step_line():
    assert step_line(3, 8, METRICS, eval_accuracy=0.1875, eta_s=100.4) == (
        "step 3/8  reward 0.12  eval 0.19  accept 1.40  arms ngram:2 60% off 25% eagle:4 10%  drafter v3  "
        "rollout 5.9s update 12.9s drafter 0.0s  eta 1m40s")


def test_what_a_step_lacks_is_left_out():
    line = step_line(8, 8, {"train/reward": 0.5, "timing_s/rollout": 1.0}, eta_s=0.0)
    assert line == "step 8/8  reward 0.50  rollout 1.0s"  # no eval, no SD, no learner; no eta at the end


def test_arm_mix_and_durations():
    assert arm_mix({"sd/arm_frac/off": 1.0}) == "off 100%" and arm_mix({}) == ""
    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 3720)] == ["0s", "1m00s", "1m01s", "59m59s", "1h02m"]

