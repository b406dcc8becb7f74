"""``respec bench --online``: the same GRPO run with and without the online drafter learner.

Arms (every one from the same initial actor and drafter, the same seed, prompts and settings):

  a   no SD (plain AR rollouts)            a2  a with the next seed (the seed-to-seed spread)
  b   frozen EAGLE drafter (static k)      c   online KD, unweighted, sync
  d   online KD, reward-weighted, sync     e   d, asynchronous with I = 1
  f   d, triggered by an acceptance drop   g   the full system: adaptive server + e

Per step: acceptance length, rollout time, step time, reward and the drafter's version; the summary
gives the frozen drafter's drift, online vs frozen acceptance over the last third, async vs sync step
time and the share of drafter training hidden, reward curves a vs e against a vs a2, and step time of
g against a. Results go to JSON, a table and ``online_learner.png``.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..rl.config import load_config
from ..rl.trainer import Trainer

ARMS = {
    "a": ("no SD", ["rollout.speculative=off", "learner.mode=off"]),
    "a2": ("no SD, seed + 1", ["rollout.speculative=off", "learner.mode=off"]),
    "b": ("frozen drafter", ["rollout.speculative={k}", "learner.mode=off"]),
    "c": ("online KD, unweighted (sync)", ["rollout.speculative={k}", "learner.mode=sync", "learner.weighting=none"]),
    "d": ("online KD, reward-weighted (sync)", ["rollout.speculative={k}", "learner.mode=sync",
                                                "learner.weighting=reward"]),
    "e": ("d, async I=1", ["rollout.speculative={k}", "learner.mode=async", "learner.every=1",
                           "learner.weighting=reward"]),
    "f": ("d, triggered", ["rollout.speculative={k}", "learner.mode=triggered", "learner.weighting=reward"]),
    "g": ("adaptive server + async learner", ["rollout.speculative=adaptive", "learner.mode=async",
                                              "learner.every=1", "learner.weighting=reward"]),
}
PER_STEP = ("train/reward", "sd/accept_len", "timing_s/rollout", "timing_s/step", "timing_s/update",
            "timing_s/drafter", "drafter/version", "drafter/tau_sim", "drafter/train_time_s", "drafter/wait_s",
            "sd/enabled_frac")


def run_online_bench(config_path: str | None, drafter: str, arms: list[str], steps: int, out_dir: Path,
                     overrides: list[str]) -> dict:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms: unknown {unknown}; choose from {list(ARMS)}")
    base = [f"steps={steps}", "eval_every=0", "checkpoint_every=0", "rollout.compare_ar_every=0", *overrides]
    # Static arms draft at the adaptive controller's largest k.
    k = max(load_config(config_path, base).rollout.controller.ks)
    results = {"config": config_path, "drafter": drafter, "steps": steps, "overrides": overrides, "arms": {}}
    for arm in arms:
        label, arm_overrides = ARMS[arm]
        drafters = [drafter, "ngram"] if arm == "g" else [drafter]
        config = load_config(config_path, [*base, *(o.format(k=k) for o in arm_overrides),
                                           f"rollout.drafters=[{','.join(drafters)}]", f"out_dir={out_dir / arm}"])
        if arm == "a2":
            config.seed += 1
        print(f"--- arm {arm}: {label}", flush=True)
        trainer = Trainer(config, overwrite=True)  # an earlier bench's arm is replaced, never mixed in
        if trainer.directory.moved_aside is not None:
            shutil.rmtree(trainer.directory.moved_aside)
        rows = []
        try:
            for _ in range(steps):
                metrics = trainer.train_step()
                trainer.metrics.log(trainer.step, metrics)
                rows.append({k: metrics.get(k) for k in PER_STEP})
                print(_step_line(arm, trainer.step, rows[-1]), flush=True)
        finally:
            trainer.close()
        results["arms"][arm] = {"label": label, "steps": rows}
    results["summary"] = summarize(results["arms"])
    return results


def _step_line(arm: str, step: int, row: dict) -> str:
    def fmt(key: str, spec: str = ".2f") -> str:
        return "-" if row.get(key) is None else format(row[key], spec)

    return (f"{arm} step {step}: reward {fmt('train/reward')} accept_len {fmt('sd/accept_len')} "
            f"rollout {fmt('timing_s/rollout', '.1f')} s step {fmt('timing_s/step', '.1f')} s "
            f"drafter v{fmt('drafter/version', '.0f')} tau_sim {fmt('drafter/tau_sim')}")


def _thirds(values: list[float | None]) -> tuple[float | None, float | None]:
    clean = [v for v in values if v is not None]
    if len(clean) < 3:
        return None, None
    third = max(1, len(clean) // 3)
    return statistics.fmean(clean[:third]), statistics.fmean(clean[-third:])


def _series(arms: dict, arm: str, key: str) -> list:
    return [row.get(key) for row in arms[arm]["steps"]] if arm in arms else []


def _mean(values: list) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.fmean(clean) if clean else None


def summarize(arms: dict) -> dict:
    out: dict[str, float | None] = {}
    for arm in arms:
        first, last = _thirds(_series(arms, arm, "sd/accept_len"))
        out[f"{arm}/accept_len_first_third"], out[f"{arm}/accept_len_last_third"] = first, last
        out[f"{arm}/step_s"] = _mean(_series(arms, arm, "timing_s/step"))
        out[f"{arm}/rollout_s"] = _mean(_series(arms, arm, "timing_s/rollout"))
        out[f"{arm}/reward"] = _mean(_series(arms, arm, "train/reward"))
    first, last = out.get("b/accept_len_first_third"), out.get("b/accept_len_last_third")
    if first and last:
        out["frozen_drop"] = 1 - last / first
    for arm in ("c", "d", "e", "f", "g"):
        if out.get(f"{arm}/accept_len_last_third") and out.get("b/accept_len_last_third"):
            out[f"{arm}_vs_frozen_last_third"] = out[f"{arm}/accept_len_last_third"] / out["b/accept_len_last_third"]
    if out.get("d/step_s") and out.get("e/step_s"):
        out["async_vs_sync_step"] = out["e/step_s"] / out["d/step_s"]
    if "e" in arms:
        train = _series(arms, "e", "drafter/train_time_s")[-1] or 0.0
        wait = _series(arms, "e", "drafter/wait_s")[-1] or 0.0
        out["e/drafter_train_s"], out["e/drafter_wait_s"] = train, wait
        out["e/hidden_fraction"] = 1 - wait / train if train else None
    for other in ("e", "a2"):
        if "a" in arms and other in arms:
            pairs = zip(_series(arms, "a", "train/reward"), _series(arms, other, "train/reward"))
            out[f"reward_gap_a_{other}"] = _mean([abs(x - y) for x, y in pairs])
    for arm in ("c", "d", "e", "f", "g"):  # the ledger: drafter training spent vs rollout time saved
        if arm in arms and "a" in arms:
            out[f"{arm}/drafter_train_s"] = _series(arms, arm, "drafter/train_time_s")[-1]
            out[f"{arm}/rollout_saved_s"] = (sum(_series(arms, "a", "timing_s/rollout"))
                                             - sum(_series(arms, arm, "timing_s/rollout")))
    if out.get("a/step_s") and out.get("g/step_s"):
        out["full_system_speedup"] = out["a/step_s"] / out["g/step_s"]
    return out


def format_online_table(result: dict) -> str:
    lines = ["| arm | system | accept_len first / last third | rollout s | step s | reward |",
             "| --- | --- | --- | --- | --- | --- |"]
    summary = result["summary"]

    def fmt(value, spec=".2f") -> str:
        return "-" if value is None else format(value, spec)

    for arm, data in result["arms"].items():
        lines.append(f"| {arm} | {data['label']} | {fmt(summary[f'{arm}/accept_len_first_third'])} / "
                     f"{fmt(summary[f'{arm}/accept_len_last_third'])} | {fmt(summary[f'{arm}/rollout_s'], '.1f')} | "
                     f"{fmt(summary[f'{arm}/step_s'], '.1f')} | {fmt(summary[f'{arm}/reward'], '.3f')} |")
    extras = {k: v for k, v in summary.items()
              if "/" not in k or k.startswith("e/") or k.endswith(("drafter_train_s", "rollout_saved_s"))}
    lines += ["", *(f"{k}: {fmt(v, '.3f')}" for k, v in extras.items())]
    return "\n".join(lines)


def plot_online(result: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for index, (arm, data) in enumerate(result["arms"].items()):
        steps = range(1, len(data["steps"]) + 1)
        for ax, key in zip(axes, ("sd/accept_len", "timing_s/step", "train/reward")):
            values = [row.get(key) for row in data["steps"]]
            if any(v is not None for v in values):  # one colour per arm in every panel
                ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", ms=3,
                        color=f"C{index}", label=f"{arm}: {data['label']}")
    for ax, title in zip(axes, ("acceptance length (tokens / verify step)", "RL step time (s)", "mean reward")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)  # the reward panel has every arm
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_online_results(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot_online(result, out.with_suffix(".png"))
