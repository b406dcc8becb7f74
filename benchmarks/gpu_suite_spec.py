"""The suite's speculative sections: SD vs AR per drafter and k, and the adaptive controller against every
static arm (fixed batches and the long tail) with the cost profile t(batch, tokens) it decides on."""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace

import numpy as np
from gpu_suite_setup import Budget, md_table

from respec import LLM, SamplingParams
from respec.bench.adaptive import (
    _fixed_workload,
    _long_tail_workload,
    build_systems,
    long_tail_budgets,
    long_tail_headroom,
)
from respec.bench.spec import _arm
from respec.engine.stats import summarize_trace

WARM_UP_TOKENS = 4  # each arm's first run at a batch size: allocations, kernel selection


# ------------------------------------------------------------------------------------- SD vs AR
def _spec_batch(arms: dict, warm: dict, repeats: int) -> dict[str, dict]:
    """bench.spec's measurement: a short warm-up each, then ``repeats`` rounds with the arms alternating."""
    for run in warm.values():
        run()
    runs: dict[str, list[tuple]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            runs[name].append(run())
    return {name: {"seconds": statistics.median(r[0] for r in rs), "tokens": int(statistics.median(r[1] for r in rs)),
                   "tokens_per_s": statistics.median(r[1] / r[0] for r in rs),
                   "accept_len": statistics.median(r[2] for r in rs), "accept_rate": statistics.median(r[3] for r in rs)}
            for name, rs in runs.items()}


def spec(ctx, sizes, budget: Budget) -> dict:
    """AR and each static ``drafter:k`` on the same prompts; rows stop at EOS as rollouts do."""
    llm, rows = ctx.llm, []
    engines = {"ar": llm}
    for drafter in ctx.drafters(eagle=True):
        for k in sizes.ks:
            engines[f"{drafter}:{k}"] = LLM(llm.model, tokenizer=llm.tokenizer, drafter=drafter, speculative=k,
                                            max_num_seqs=max(sizes.batches))
    for batch in sizes.batches:
        if not budget.take(f"batch {batch}"):
            continue
        params = SamplingParams(temperature=sizes.spec_temperature, max_new_tokens=sizes.new_tokens, seed=0)
        arms, warm = ({name: _arm(engine, ctx.batch_prompts(batch), p) for name, engine in engines.items()}
                      for p in (params, replace(params, max_new_tokens=WARM_UP_TOKENS)))
        measured = _spec_batch(arms, warm, sizes.spec_repeats)
        ar = measured["ar"]["tokens_per_s"]
        for name, m in measured.items():
            rows.append({"arm": name, "batch": batch, **m, "vs_ar": m["tokens_per_s"] / ar})
            if name == "ar":
                rows[-1]["accept_len"] = rows[-1]["accept_rate"] = None
    table = md_table(["arm", "batch", "tokens", "seconds", "tok/s", "tau", "accept rate", "vs AR"],
                     [[r["arm"], r["batch"], r["tokens"], r["seconds"], r["tokens_per_s"], r["accept_len"],
                       r["accept_rate"], f"{r['vs_ar']:.2f}x"] for r in rows])
    note = ctx.acceptance_note()
    return {"temperature": sizes.spec_temperature, "new_tokens": sizes.new_tokens, "ks": list(sizes.ks),
            "rows": rows, "skipped_sizes": budget.skipped,
            "markdown": f"T = {sizes.spec_temperature}, up to {sizes.new_tokens} new tokens per row. {note}\n\n{table}"}


# ---------------------------------------------------------------------------------------- adaptive
def cost_profile(controller) -> dict:
    """The controller's t(batch, tokens): the start-up profile and, after the runs, its corrected
    estimate (profile x the online correction), in ms; how often each cell was measured; the drafters'
    learned seconds per draft step per batch bucket."""
    cost = controller.cost
    batches = [int(b) for b in cost.batches]
    tokens = list(range(1, cost.max_tokens + 1))
    corrected = [[1e3 * cost.target_time(b, t) for t in tokens] for b in batches]
    return {"batches": batches, "tokens": tokens, "profile_ms": (1e3 * cost.table).tolist(),
            "corrected_ms": corrected, "observed": cost.observed.tolist(),
            "draft_step_ms": {name: [None if np.isnan(v) else 1e3 * float(v) for v in values]
                              for name, values in cost.draft_step.items()}}


def adaptive(ctx, sizes, budget: Budget) -> dict:
    """bench.adaptive's workloads (one controller for the whole section): each fixed batch, then the long
    tail (Pareto budgets, the active batch decays) with its headroom bound."""
    rows_needed = max(*sizes.batches, sizes.long_tail_rows)
    base = LLM(ctx.llm.model, tokenizer=ctx.llm.tokenizer, max_num_seqs=rows_needed)
    systems = build_systems(base, ctx.drafters(eagle=True), sizes.adaptive_ks, rows_needed, 0,
                            {"profile_cache": str(ctx.out)})
    prompts, temperature = ctx.batch_prompts(rows_needed), sizes.spec_temperature
    fixed = Budget(max(budget.seconds - sizes.long_tail_reserve_s - budget.spent(), 0.0))
    rows, paired = [], []
    for batch in sizes.batches:
        if not fixed.take(f"batch {batch}"):
            continue
        got, pairs, _ = _fixed_workload(systems, prompts, (batch,), temperature, sizes.adaptive_tokens,
                                        sizes.adaptive_repeats, 0)
        rows += [asdict(r) for r in got]
        paired += pairs
    skipped, headroom = list(fixed.skipped), None
    if budget.spent() + 1 < budget.seconds:
        budgets = long_tail_budgets(sizes.long_tail_rows, 16, sizes.long_tail_max, 1.2, 0)
        got, tail = _long_tail_workload(systems, prompts, budgets, temperature, sizes.adaptive_repeats, 0)
        rows += [asdict(r) for r in got]
        headroom = long_tail_headroom(systems, budgets, tail)
    else:
        skipped.append(f"long tail: budget {budget.seconds:.0f} s spent")
    controller = systems["adaptive"].engine.controller
    summary = summarize_trace(controller.trace, warmup=10)
    profile = cost_profile(controller)
    return {"temperature": temperature, "ks": list(sizes.adaptive_ks), "new_tokens": sizes.adaptive_tokens,
            "rows": rows, "off_vs_ar_step": paired, "long_tail_headroom": headroom,
            "prediction_median_relative_error": summary.median_relative_error, "cost_profile": profile,
            "skipped_sizes": skipped, "markdown": _adaptive_markdown(rows, profile, summary, ctx.acceptance_note())}


def _adaptive_markdown(rows: list[dict], profile: dict, summary, note: str) -> str:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    table = []
    for workload, batch in dict.fromkeys((r["workload"], r["batch_size"]) for r in rows):
        mine = {r["config"]: r for r in rows if r["workload"] == workload and r["batch_size"] == batch}
        ours = mine.get("adaptive", {})
        best = max((r for c, r in mine.items() if c not in ("adaptive", "off")), key=lambda r: r["tokens_per_s"],
                   default=None)
        table.append([workload, batch] + [mine[c]["tokens_per_s"] if c in mine else None for c in configs]
                     + [ours.get("vs_best_other"), ours.get("vs_best_paired"),
                        ours["tokens_per_s"] / best["tokens_per_s"] if ours and best else None,
                        ", ".join(f"{a} {n}" for a, n in ours.get("arms", {}).items())])
    speed = md_table(["workload", "batch", *configs, "adaptive vs best", "(paired)", "vs best static", "adaptive's steps"],
                     table)
    cells = md_table(["batch", *[f"t={t} profile / corrected ms (n)" for t in profile["tokens"]]],
                     [[b] + [f"{p:.2f} / {c:.2f} ({n})" for p, c, n in zip(profile["profile_ms"][i],
                                                                         profile["corrected_ms"][i],
                                                                         profile["observed"][i])]
                      for i, b in enumerate(profile["batches"])])
    return (f"Tokens/s per system. {note}\n\n{speed}\n\nController: median |predicted - measured| / measured "
            f"after warm-up {summary.median_relative_error:.1%}.\n\nCost profile t(batch, tokens per row), one "
            f"target forward:\n\n{cells}")
