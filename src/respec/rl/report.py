"""``respec report RUN_DIR``: PNG plots of a run's metrics and a short markdown summary."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .metrics import read_metrics

PLOTS = {
    "reward.png": ("train/reward", "mean reward"),
    "eval_accuracy.png": ("eval/accuracy", "eval accuracy"),
    "accept_len.png": ("sd/accept_len", "acceptance length (tokens per verify step)"),
    "rollout_time.png": ("rollout/time_s", "rollout seconds per step"),
}
PHASES = ("timing_s/rollout", "timing_s/reward", "timing_s/update", "timing_s/drafter")


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in rows if r.get(name) is not None and math.isfinite(r[name])]
    return [p[0] for p in points], [p[1] for p in points]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def make_report(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    for filename, (name, label) in PLOTS.items():
        steps, values = series(rows, name)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if name == "rollout/time_s":
            ar_steps, ar = series(rows, "rollout/ar_time_s")
            if ar:
                ax.plot(ar_steps, ar, marker="x", linestyle="--", label="AR, same prompts")
                ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = None
    for phase in PHASES:
        steps, values = series(rows, phase)
        if not steps:
            continue
        ax.bar(steps, values, bottom=bottom, label=phase.split("/")[1])
        bottom = values if bottom is None else [a + b for a, b in zip(bottom, values)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_split.png", dpi=110)
    plt.close(fig)
    (out / "summary.md").write_text(summary(rows))
    return out


def summary(rows: list[dict]) -> str:
    _, accuracy = series(rows, "eval/accuracy")
    _, reward = series(rows, "train/reward")
    _, tau = series(rows, "sd/accept_len")
    _, speedup = series(rows, "rollout/sd_speedup")
    lines = ["# Run summary", "", f"- steps: {max((r['step'] for r in rows), default=0)}"]
    if accuracy:
        lines.append(f"- eval accuracy: {accuracy[0]:.3f} before, {accuracy[-1]:.3f} after")
    if reward:
        head, tail = reward[: max(1, len(reward) // 4)], reward[-max(1, len(reward) // 4):]
        lines.append(f"- mean reward: {_mean(head):.3f} in the first quarter, {_mean(tail):.3f} in the last")
    if tau:
        lines.append(f"- mean acceptance length: {_mean(tau):.2f}")
    if speedup:
        lines.append(f"- rollout speed-up of SD over AR on the same prompts: {_mean(speedup):.2f}x (mean)")
    for phase in PHASES:
        _, values = series(rows, phase)
        if values:
            lines.append(f"- {phase}: {_mean(values):.2f} s per step")
    return "\n".join(lines + workers_table(rows)) + "\n"


WORKER_COLUMNS = ("tokens_per_s", "busy_s", "idle_s", "dispatch_s", "items", "drafter_lag")


def workers_table(rows: list[dict]) -> list[str]:
    """Per rollout worker (distributed runs), means over the steps it served."""
    workers = sorted({key.split("/")[1] for r in rows for key in r if re.match(r"dist/worker\d+/", key)},
                     key=lambda w: int(w.removeprefix("worker")))
    if not workers:
        return []
    _, sync_s = series(rows, "dist/weight_sync_s")
    _, sync_mb = series(rows, "dist/weight_sync_mb")
    lines = ["", "## Rollout workers", "",
             f"- weight sync: {_mean(sync_s):.3f} s and {_mean(sync_mb):.1f} MB per step (mean)", "",
             "| worker | " + " | ".join(WORKER_COLUMNS) + " |", "|" + " --- |" * (len(WORKER_COLUMNS) + 1)]
    for worker in workers:
        cells = []
        for column in WORKER_COLUMNS:
            _, values = series(rows, f"dist/{worker}/{column}")
            cells.append(f"{_mean(values):.2f}" if values else "-")
        lines.append(f"| {worker} | " + " | ".join(cells) + " |")
    return lines
