"""``respec demo`` (``make demo``): a short GRPO run of SmolLM2-135M-Instruct on arithmetic with
speculative rollouts, on the CPU, ending with the figures that matter side by side."""

from __future__ import annotations

import shutil
import time

from ..models.presets import DRAFTER_PRESETS, preset_key
from .config import load_config
from .metrics import read_metrics
from .report import make_report, series
from .trainer import Trainer

DEMO_OVERRIDES = [
    "out_dir=runs/demo", "steps=8", "eval_every=8", "eval_max_new_tokens=64", "checkpoint_every=0",
    "task.name=arithmetic", "task.levels=[1, 2]", "task.num_train=1000", "task.num_eval=64",
    "rollout.prompts_per_step=8", "rollout.group_size=8", "rollout.temperature=0.8", "rollout.max_new_tokens=64",
    "rollout.speculative=adaptive", "rollout.controller.max_draft_tokens=4",
    "rollout.compare_ar_every=4",
    "optim.lr=2e-6", "optim.warmup_steps=1", "optim.micro_batch_size=16",
]


def drafter_overrides(model: str, extra: list[str]) -> list[str]:
    """The full system where ReSpec ships a head for the model (the head and the n-gram drafter under
    the adaptive controller, the online learner updating the head in the background); else, or when
    the user picks the drafters or speculation, n-gram alone and no learner."""
    key = preset_key(model)
    heads = [name for name, preset in DRAFTER_PRESETS.items() if key is not None and preset.target == key]
    if not heads or any(item.startswith(("rollout.drafters=", "rollout.speculative=")) for item in extra):
        return ["rollout.drafters=[ngram]"]
    return [f"rollout.drafters=[{heads[0]}, ngram]", "learner.mode=async", f"learner.drafter={heads[0]}"]


def run_demo(model: str = "smollm2-135m", extra: list[str] | None = None) -> int:
    started = time.perf_counter()
    extra = extra or []
    config = load_config(None, [f"model={model}", *DEMO_OVERRIDES, *drafter_overrides(model, extra), *extra])
    print(f"GRPO on {config.model}: {config.steps} steps x {config.rollout.prompts_per_step} prompts x "
          f"{config.rollout.group_size} samples, speculative rollouts ({config.rollout.speculative}, "
          f"drafters {config.rollout.drafters}), eval on {config.task.num_eval} held-out problems", flush=True)
    trainer = Trainer(config, overwrite=True)  # each demo is a new run: the previous demo's is removed
    if trainer.directory.moved_aside is not None:
        shutil.rmtree(trainer.directory.moved_aside)
        print(f"(removed the previous demo run from {config.out_dir})", flush=True)
    summary = trainer.train()
    rows = read_metrics(config.out_dir)
    report = make_report(config.out_dir)
    _, tau = series(rows, "sd/accept_len")
    _, sd_time = series(rows, "rollout/time_s")
    paired = [(r["step"], r["rollout/time_s"], r["rollout/ar_time_s"]) for r in rows if r.get("rollout/ar_time_s")]
    print("\n=== ReSpec demo ===")
    print(f"eval accuracy:        {summary.get('eval/accuracy_before', float('nan')):.3f} before -> "
          f"{summary.get('eval/accuracy', float('nan')):.3f} after {config.steps} steps")
    print(f"mean acceptance len:  {sum(tau) / len(tau):.2f} tokens per verify step" if tau else
          "mean acceptance len:  - (the controller kept speculation off)")
    for line in drafter_lines(trainer.llm.stats.spec.by_version, rows):
        print(line)
    print(f"rollout per step:     {sum(sd_time) / len(sd_time):.1f} s (speculative, mean over the run)")
    for step, sd, ar in paired:
        print(f"  step {step}, same prompts: speculative {sd:.1f} s vs autoregressive {ar:.1f} s ({ar / sd:.2f}x)")
    phases = {p: series(rows, f"timing_s/{p}")[1] for p in ("rollout", "reward", "update", "drafter")}
    print("time per RL step:     " + ", ".join(f"{p} {sum(v) / len(v):.1f} s" for p, v in phases.items() if v))
    print(f"plots and summary:    {report}/ (respec report {config.out_dir})")
    print(f"total demo time:      {time.perf_counter() - started:.0f} s")
    return 0


def drafter_lines(by_version: dict[str, list[int]], rows: list[dict]) -> list[str]:
    """Per drafter: the acceptance length of each weights version that drafted ("eagle@v3"), and the
    versions the online learner published."""
    lines = []
    for name in dict.fromkeys(key.split("@")[0] for key in by_version):
        versions = sorted((int(key.split("@v")[1]), counts) for key, counts in by_version.items()
                          if key.startswith(f"{name}@v"))
        taus = " ".join(f"v{v} {c[3] / c[0]:.2f}" for v, c in versions if c[0])
        lines.append(f"{name + ' acceptance:':<22}{taus} (tokens per verify step, by weights version)")
    _, published = series(rows, "drafter/published")
    if published:  # a round still running at the last step publishes after it (the final eval drafts with it)
        seen = max((int(key.split("@v")[1]) for key in by_version), default=0)
        lines.append(f"online learner:       {max(int(published[-1]), seen)} head versions published, "
                     f"drafting lagged the actor by {max(series(rows, 'drafter/target_version_gap')[1], default=0):.0f} "
                     f"steps at most")
    return lines
