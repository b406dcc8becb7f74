"""The adaptive controller's choices in a simulated world whose truth is known: its settings compared.

A fixed world, set near what this repository measured on a 2-core CPU with SmolLM2-135M at T = 0.7: a
target step costs 30 ms + 2.6 ms per row-token (+ a small quadratic term), an EAGLE head 6 ms per draft
step with per-position acceptance 0.48, 0.44, an n-gram drafter 0.5 ms per step with 0.18, 0.50. Each
measured step time carries lognormal noise (15%), as on a shared machine. The controller under test is
the real ``AdaptiveController`` with a profile off by a few percent; it never sees the truth.

Two figures per setting:
* batch-1 start: over 100 seeds, the share of steps 40-160 that ran the EAGLE head (the best drafter
  at batch 1 here), and how many starts left it under 30% of them (locked out by unlucky first steps);
* goodput: each call's tokens/s over the best single arm's expected tokens/s, mean and 10th percentile
  over seeds, for a schedule of calls at batch 1, 2, 4, 16 and 64 (the first call at each size skipped);
  again with the profile's off column mispriced (``--off-bias``, 1.35x: too slow), where off is the best
  arm at batch 16 and 64 and only exploring costs finds it.

    python benchmarks/controller_sim.py --out controller_sim.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from respec.engine.controller import AdaptiveController, Arm
from respec.engine.cost_model import CostModel
from respec.engine.profile import batch_grid
from respec.engine.speculation import ControllerConfig
from respec.utils.configs import from_dict

RATES = {"eagle": np.array([0.48, 0.44]), "ngram": np.array([0.18, 0.50])}
DRAFT_STEP_S = {"eagle": 6e-3, "ngram": 0.5e-3}
CATCH_UP = {"eagle": "none", "ngram": "none"}  # EAGLE shadows while it sits out: switching on is free
SETTINGS = {  # ControllerConfig overrides of the defaults (Thompson sampling); its constants under "tuning"
    "default": {},
    "no exploration": {"explore": False},
    "prior 4": {"tuning": {"prior_weight": 4.0}},
    "no cost draws": {"tuning": {"cost_spread": 0.0}},
    "sharpness 1": {"tuning": {"thompson_sharpness": 1.0}},
    "memory 256": {"acceptance_memory": 256.0},
}
SCHEDULE = [(1, 40)] * 4 + [(2, 40)] * 4 + [(4, 40)] * 4 + [(16, 40)] * 2 + [(64, 40)] * 2


def target_s(batch: int, tokens: int) -> float:
    work = batch * tokens
    return 0.030 + 0.0026 * work + 0.00002 * work * work


def arm_truth(arm: Arm, batch: int) -> tuple[float, float]:
    """Expected tokens per row and seconds of one step with ``arm``."""
    if arm.drafter is None:
        return 1.0, target_s(batch, 1)
    tokens = 1 + float(np.cumprod(RATES[arm.drafter])[:arm.k].sum())
    return tokens, target_s(batch, arm.k + 1) + DRAFT_STEP_S[arm.drafter] * arm.k


def make_controller(setting: dict, seed: int, off_bias: float = 1.0) -> AdaptiveController:
    """``off_bias``: the profile's one-token (off) column that much too slow, as when a few slow off
    steps set its correction; a controller that never retries off where it is best keeps the error."""
    batches = batch_grid(64)
    truth = np.array([[target_s(b, t) for t in range(1, 4)] for b in batches])
    profile = truth * np.exp(np.random.default_rng(seed + 999).normal(0, 0.05, truth.shape))
    profile[:, 0] *= off_bias
    config = from_dict({"max_draft_tokens": 2, "k_choices": [1, 2], "seed": seed, "profile_cache": "", **setting},
                       ControllerConfig)
    return AdaptiveController(config, dict(CATCH_UP), CostModel(batches, profile))


def step(controller: AdaptiveController, batch: int, rng: np.random.Generator, noise: float) -> tuple[Arm, int, float]:
    """One simulated step: the controller chooses, the world answers, the controller learns."""
    arm = controller.choose(batch)
    hits, draft_s = None, 0.0
    if arm.drafter is not None:
        accepted = rng.random((batch, arm.k)) < RATES[arm.drafter][:arm.k]
        hits = np.cumprod(accepted, axis=1).sum(1)
        draft_s = DRAFT_STEP_S[arm.drafter] * arm.k
    emitted = batch if hits is None else int((hits + 1).sum())
    seconds = (target_s(batch, 1 if hits is None else arm.k + 1) + draft_s) * float(np.exp(rng.normal(0, noise)))
    controller.record(arm, batch, seconds, draft_s, hits, emitted)
    return arm, emitted, seconds


def batch_one_start(setting: dict, seeds: int, noise: float) -> dict:
    shares = []
    for seed in range(seeds):
        controller, rng = make_controller(setting, seed), np.random.default_rng(seed)
        arms = [step(controller, 1, rng, noise)[0] for _ in range(160)]
        shares.append(np.mean([arm.drafter == "eagle" for arm in arms[40:]]))
    return {"eagle_share": float(np.mean(shares)), "locked_out": float(np.mean(np.array(shares) < 0.3))}


def goodput(setting: dict, seeds: int, noise: float, off_bias: float = 1.0) -> dict[int, dict]:
    ratios: dict[int, list[float]] = {}
    for seed in range(seeds):
        controller, rng = make_controller(setting, seed, off_bias), np.random.default_rng(seed)
        seen: set[int] = set()
        for batch, steps in SCHEDULE:
            results = [step(controller, batch, rng, noise) for _ in range(steps)]
            best = max(batch * tokens / seconds for tokens, seconds in (arm_truth(a, batch) for a in controller.arms))
            if batch in seen:
                ratios.setdefault(batch, []).append(sum(r[1] for r in results) / sum(r[2] for r in results) / best)
            seen.add(batch)
    return {b: {"mean": float(np.mean(v)), "p10": float(np.percentile(v, 10))} for b, v in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--noise", type=float, default=0.15, help="sd of the lognormal noise on step times")
    parser.add_argument("--off-bias", type=float, default=1.35,
                        help="second goodput world: the profile's off column this much too slow")
    parser.add_argument("--eagle-rates", default="0.48,0.44",
                        help="the EAGLE head's true per-position acceptance (0.36,0.22: a second draft that "
                             "pays less than the first, as measured at batch 1)")
    parser.add_argument("--only", default=None, help="run only this setting (a name from SETTINGS)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    RATES["eagle"] = np.array([float(r) for r in args.eagle_rates.split(",")])
    settings = {args.only: SETTINGS[args.only]} if args.only else SETTINGS
    arms = make_controller({}, 0).arms
    print("best arm per batch: " + ", ".join(
        f"{b}: " + max(arms, key=lambda a: arm_truth(a, b)[0] / arm_truth(a, b)[1]).label for b in (1, 2, 4, 16, 64)))
    print(f"{'setting':<24}{'EAGLE share':>12}{'locked out':>11}  goodput / best arm: mean (p10)")
    result = {}
    for name, setting in settings.items():
        start = batch_one_start(setting, 100, args.noise)
        ratios = goodput(setting, args.seeds, args.noise)
        biased = goodput(setting, args.seeds, args.noise, args.off_bias)
        result[name] = {"setting": setting, "batch_one_start": start, "goodput_vs_best": ratios,
                        "goodput_vs_best_off_mispriced": biased}
        cells = "  ".join(f"b{b} {r['mean']:.3f} ({r['p10']:.2f})" for b, r in ratios.items())
        print(f"{name:<24}{start['eagle_share']:>12.2f}{start['locked_out']:>11.2f}  {cells}", flush=True)
        cells = "  ".join(f"b{b} {r['mean']:.3f} ({r['p10']:.2f})" for b, r in biased.items())
        print(f"{'  off priced x' + str(args.off_bias):<47}{cells}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seeds": args.seeds, "noise": args.noise, "off_bias": args.off_bias,
                       "eagle_rates": RATES["eagle"].tolist(), "settings": result}, f, indent=2)


if __name__ == "__main__":
    main()
