"""The suite's GRPO section: a few steps of ``respec train`` with AR rollouts, then with adaptive SD and the
async online learner, from the same weights, seed and prompts; the step split from the trainer's own
metrics and how much of the learner's training the trainer thread never waited on."""

from __future__ import annotations

import shutil
import statistics

from gpu_suite_setup import Budget, md_table, require_modules

PHASES = ("rollout", "reward", "update", "drafter", "step")


def synthetic_reward(texts: list[str], gold: list[str]) -> list[float]:
    """For random weights, whose answers are never right: the share of characters whose code point is a
    multiple of 4, so groups differ and the update has rows to train on (timing only)."""
    return [sum(1 for c in t if ord(c) % 4 == 0) / len(t) if t else 0.0 for t in texts]


def _overrides(ctx, sizes, out_dir) -> list[str]:
    return [f"model={ctx.choice.path}", f"out_dir={out_dir}", f"device={ctx.device}", f"dtype={ctx.dtype_name}",
            f"steps={sizes.grpo_steps}", "eval_every=0", "checkpoint_every=0", "task.levels=[1,2]",
            "task.num_train=512", "task.num_eval=1", f"rollout.prompts_per_step={sizes.grpo_prompts}",
            f"rollout.group_size={sizes.grpo_group}", f"rollout.max_new_tokens={sizes.grpo_tokens}",
            "rollout.temperature=0.8", f"rollout.max_num_seqs={sizes.grpo_prompts * sizes.grpo_group}",
            f"rollout.controller.profile_cache={ctx.out}"]


def _arms(ctx, sizes) -> dict[str, list[str]]:
    head = ctx.eagle_head_dir()
    return {"ar": ["rollout.speculative=off"],
            "adaptive SD + async learner": [
                "rollout.speculative=adaptive", f'rollout.drafters=["ngram", "{head}"]',
                f"rollout.controller.max_draft_tokens={max(sizes.adaptive_ks)}", "learner.mode=async",
                f"learner.min_buffer_tokens={sizes.grpo_learner_min_tokens}",
                f"learner.updates_per_round={sizes.grpo_learner_updates}", "learner.batch_size=8"]}


def _run_arm(ctx, sizes, name: str, overrides: list[str]) -> dict:
    from respec.rl.config import load_config
    from respec.rl.trainer import Trainer

    out_dir = ctx.out / "grpo" / name.split()[0]
    config = load_config(None, _overrides(ctx, sizes, out_dir) + overrides)
    trainer = Trainer(config, reward_fn=synthetic_reward if ctx.choice.random else None)
    try:
        steps = [trainer.train_step() for _ in range(sizes.grpo_steps)]
    finally:
        trainer.close()  # joins the learner's thread after its last round
    later = steps[1:] or steps  # the first step pays the warm-ups
    arm = {"steps": [{p: s[f"timing_s/{p}"] for p in PHASES} | {
        "accept_len": s.get("sd/accept_len"), "sd_enabled_frac": s.get("sd/enabled_frac"),
        "response_tokens": s["train/response_length"], "train_reward": s["train/reward"]} for s in steps],
           "median_after_first": {p: statistics.median(s[f"timing_s/{p}"] for s in later) for p in PHASES}}
    if trainer.learner is not None:
        arm["learner"] = _learner_figures(trainer, steps[-1])
    return arm


def _learner_figures(trainer, last: dict) -> dict:
    """The learner's training seconds (all rounds, after the final join) against the trainer thread's
    seconds spent on it: during the steps (copies of the actor's tables; ``drafter/wait_s`` of the last
    step) and in the join at the end, where a longer run would be rolling out. Hidden: at least
    1 - (steps + join) / trained, at most 1 - steps / trained. On CUDA the rounds run on their own stream."""
    worker, learner = trainer.learner_worker, trainer.learner
    trained, in_steps = learner.train_time_s, last.get("drafter/wait_s", 0.0)
    join = worker.wait_s - in_steps
    return {"rounds": len(worker.rounds), "published_version": learner.version, "updates": learner.updates,
            "train_s": trained, "trainer_wait_in_steps_s": in_steps, "final_join_s": join,
            "fraction_hidden_at_least": 1 - (in_steps + join) / trained if trained > 0 else None,
            "fraction_hidden_at_most": 1 - in_steps / trained if trained > 0 else None,
            "own_cuda_stream": learner.head.fc.weight.is_cuda, "error": worker.error}


def grpo(ctx, sizes, budget: Budget) -> dict:
    require_modules("math_verify")  # the trainer logs train/accuracy through it every step
    shutil.rmtree(ctx.out / "grpo", ignore_errors=True)
    arms = {}
    for name, overrides in _arms(ctx, sizes).items():
        if budget.take(name):
            arms[name] = _run_arm(ctx, sizes, name, overrides)
    return {"prompts_per_step": sizes.grpo_prompts, "group_size": sizes.grpo_group,
            "max_new_tokens": sizes.grpo_tokens, "steps": sizes.grpo_steps,
            "reward": "synthetic (random weights)" if ctx.choice.random else "correctness", "arms": arms,
            "skipped_sizes": budget.skipped, "markdown": _markdown(arms)}


def _markdown(arms: dict) -> str:
    rows = [[name, *[a["median_after_first"][p] for p in PHASES]] for name, a in arms.items()]
    table = md_table(["arm", *[f"{p} s" for p in PHASES]], rows)
    per_step = md_table(["arm", "step", *[f"{p} s" for p in PHASES], "tau", "SD on", "tokens/row", "reward"],
                        [[name, i + 1, *[s[p] for p in PHASES], s["accept_len"], s["sd_enabled_frac"],
                          s["response_tokens"], s["train_reward"]] for name, a in arms.items() for i, s in enumerate(a["steps"])])
    lines = [f"Median per step after the first:\n\n{table}\n\nEvery step:\n\n{per_step}"]
    for name, a in arms.items():
        if "learner" in a:
            lr = a["learner"]
            low, high = lr["fraction_hidden_at_least"], lr["fraction_hidden_at_most"]
            hidden = "-" if low is None else f"{low:.0%}-{high:.0%}"
            lines.append(f"{name}: online learner {lr['rounds']} rounds ({lr['updates']} updates, published "
                         f"v{lr['published_version']}), {lr['train_s']:.2f} s of training; the trainer thread spent "
                         f"{lr['trainer_wait_in_steps_s']:.3f} s on it during the steps and {lr['final_join_s']:.2f} s "
                         f"in the final join: {hidden} hidden; own CUDA stream: {lr['own_cuda_stream']}"
                         + (f"; error: {lr['error'].splitlines()[-1]}" if lr["error"] else ""))
    return "\n\n".join(lines)
