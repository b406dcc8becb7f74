"""Speculation policies in a simulated GPU world (respec.bench.sim): calibration first, then every policy.

Step costs are a roofline of an H100 and the paper's model shapes, fitted to the ReSpec paper's
Qwen2.5-7B grid and to EAGLE-3's SGLang figures; acceptance per position comes from measured curves
and drifts over RL steps; rollouts have long-tailed lengths. The script stops if a named paper point is
off by more than 15%. Then, per world, every policy decodes the same three rollouts (RL steps 0, 50,
100): AR, each static k, the batch-threshold rule, the paper's Solver and ours (the production
AdaptiveController on the simulated clock). It prints a table per world and writes JSON, markdown and
one PNG per world (k against the active batch over the first and last rollout).

    python benchmarks/sim_gpu_world.py --out runs/sim-gpu-world
    python benchmarks/sim_gpu_world.py --out runs/sim-gpu-world --worlds 0,7 --what-if

``--what-if`` adds two variants of ours, each the same controller code: exploration off (a
ControllerConfig setting), and an engine whose idle head never absorbs its full shadow block while it
sits out, so it lags and re-reads from the target when switched on (``World.head_absorbs=False``); and
three oracles that know every row's acceptance and the true costs (bench/sim/oracles.py), maximizing
the batch's tokens/s (ours' objective, estimated perfectly), the progress of the row with the most
tokens left (its length, which no engine knows), or that of the row with the lowest acceptance.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from respec.bench.sim.calibrate import TOLERANCE, calibration_rows, format_calibration
from respec.bench.sim.compare import (
    PolicyRun,
    default_policies,
    format_world,
    run_world,
    summarize,
    world_bounds,
)
from respec.bench.sim.oracles import OBJECTIVES, OraclePolicy
from respec.bench.sim.policies import (
    OursPolicy,
    SolverPolicy,
    StaticPolicy,
    ThresholdPolicy,
)
from respec.bench.sim.worlds import named_worlds
from respec.engine.speculation import ControllerConfig


def what_if_policies(seed: int) -> list:
    quiet = OursPolicy(ControllerConfig(seed=seed, profile_cache="", explore=False), seed=seed)
    quiet.name = "what-if: ours, exploration off"
    return [quiet] + [OraclePolicy(objective) for objective in OBJECTIVES]


def plot_k_vs_batch(world, runs, path: Path) -> None:
    """Ours' k (0 = off) against the active batch over the first and the last rollout, with the Solver's
    arm per batch size, the threshold rule and the best static k."""
    by_type = {type(r.policy): r for r in reversed(runs)}  # the first run of each type
    ours, solver, rule = by_type[OursPolicy], by_type[SolverPolicy], by_type[ThresholdPolicy]
    best = min((r for r in runs if isinstance(r.policy, StaticPolicy)), key=lambda r: r.seconds)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    rng = np.random.default_rng(0)
    batches = np.arange(1, world.workload.rows + 1)
    for ax, index in zip(axes, (0, len(world.rl_steps) - 1)):
        result = ours.results[index]
        b, k = np.array(result.batches), np.array(result.ks, dtype=float)
        ax.scatter(b * np.exp(rng.normal(0, 0.04, b.size)), k + rng.normal(0, 0.08, k.size), s=3, alpha=0.15,
                   color="tab:blue", label="ours, each step")
        ax.step(batches, [a.k for a in solver.policy.arms], where="mid", color="tab:red", label="Solver (paper)")
        ax.step(batches, [rule.policy.choose(int(x)).k for x in batches], where="mid", color="tab:green",
                linestyle=":", label=rule.name)
        ax.axhline(best.policy.arm.k, color="grey", linestyle="--", linewidth=1, label=f"best {best.name}")
        ax.set_xscale("log", base=2)
        ax.invert_xaxis()
        ax.set_xlabel("active batch (the rollout runs left to right)")
        ax.set_title(f"RL step {world.rl_steps[index]}: ours {result.seconds:.0f} s, tau {result.accept_len:.2f}",
                     fontsize=9)
    axes[0].set_ylabel("k (0 = speculation off)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(world.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_calibration() -> list[dict]:
    rows = calibration_rows()
    print("## Calibration: published vs simulated\n")
    print(format_calibration(rows) + "\n", flush=True)
    off = [r for r in rows if r["named"] and abs(r["error"]) > TOLERANCE]
    if off:
        sys.exit(f"calibration: {len(off)} named paper point(s) off by more than {TOLERANCE:.0%}: {off}")
    return rows


def lagging_run(world) -> PolicyRun:
    """Ours in the same world (same draws) with an engine whose idle head lags once its shadow is full."""
    run = run_world(replace(world, head_absorbs=False), [OursPolicy(seed=world.seed)])[0]
    run.policy.name = "what-if: ours, idle head never absorbs its shadow"
    return run


def run_one(world, what_if: bool, out: Path) -> dict:
    started = time.perf_counter()
    policies = default_policies(world) + (what_if_policies(world.seed) if what_if else [])
    runs = run_world(world, policies) + ([lagging_run(world)] if what_if else [])
    summary = summarize(world, runs, world_bounds(world))
    summary["plot"] = f"{slug(world.name)}.png"
    plot_k_vs_batch(world, runs, out / summary["plot"])
    summary["wall_s"] = time.perf_counter() - started
    print(f"## {world.name}\n\n{format_world(summary)}\n\n({summary['wall_s']:.0f} s)\n", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the JSON, markdown and PNG files")
    parser.add_argument("--worlds", default="all", help="comma-separated indices into the named worlds, or all")
    parser.add_argument("--what-if", action="store_true", help="add two what-if variants of ours")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = check_calibration()
    worlds = list(named_worlds().values())
    if args.worlds != "all":
        worlds = [worlds[int(i)] for i in args.worlds.split(",")]
    summaries = [run_one(world, args.what_if, out) for world in worlds]
    (out / "sim_gpu_world.json").write_text(json.dumps({"calibration": calibration, "worlds": summaries}, indent=1))
    lines = ["# Simulated GPU world", "", "## Calibration", "", format_calibration(calibration), ""]
    for s in summaries:
        lines += [f"## {s['world']}", "", format_world(s), "", f"![k vs active batch]({s['plot']})", ""]
    (out / "sim_gpu_world.md").write_text("\n".join(lines))
    print(f"wrote {out / 'sim_gpu_world.json'}, {out / 'sim_gpu_world.md'} and {len(summaries)} plots")


if __name__ == "__main__":
    main()
