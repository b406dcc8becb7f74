"""The line a training run prints after each RL step: what a user watches the run by.

    step 3/8  reward 0.08  eval 0.19  accept 1.13  arms ngram:2 60% off 40%  rollout 5.9s update 12.9s drafter 0.0s  eta 1m40s

Pure formatting of the step's metrics (the same names ``metrics.jsonl`` holds); fields a step does not
have (no eval this step, speculation off) are left out rather than shown as zeros.
"""

from __future__ import annotations

ARM_PREFIX = "sd/arm_frac/"


def arm_mix(metrics: dict[str, float], most: int = 3) -> str:
    """The arms the controller ran this step, largest share first: ``"ngram:2 60% off 40%"``."""
    shares = sorted(((v, k[len(ARM_PREFIX):]) for k, v in metrics.items() if k.startswith(ARM_PREFIX)), reverse=True)
    return " ".join(f"{arm} {share:.0%}" for share, arm in shares[:most])


def duration(seconds: float) -> str:
    """``"45s"``, ``"3m05s"``, ``"1h02m"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def step_line(step: int, total: int, metrics: dict[str, float], eval_accuracy: float | None = None,
              eta_s: float | None = None) -> str:
    """One line for step ``step`` of ``total`` from its metrics."""
    parts = [f"step {step}/{total}", f"reward {metrics.get('train/reward', float('nan')):.2f}"]
    if eval_accuracy is not None:
        parts.append(f"eval {eval_accuracy:.2f}")
    if "sd/accept_len" in metrics:
        parts.append(f"accept {metrics['sd/accept_len']:.2f}")
    mix = arm_mix(metrics)
    if mix:
        parts.append(f"arms {mix}")
    if "drafter/version" in metrics:
        parts.append(f"drafter v{int(metrics['drafter/version'])}")
    if "dist/workers" in metrics:
        parts.append(f"workers {int(metrics['dist/workers'])}")
    times = [f"{phase} {metrics[f'timing_s/{phase}']:.1f}s"
             for phase in ("rollout", "update", "drafter", "weight_sync") if f"timing_s/{phase}" in metrics]
    if times:
        parts.append(" ".join(times))
    if eta_s is not None and step < total:
        parts.append(f"eta {duration(eta_s)}")
    return "  ".join(parts)
