"""``respec bench --adaptive``: the adaptive controller against AR and every static configuration.

Two workloads, every system on the same prompts and seeds in one run:

* fixed batch: ``batch`` rows that all decode exactly ``new_tokens`` tokens (EOS ignored), so the active
  batch stays put; systems alternate within each repeat (in a new seeded order each time), each repeat
  samples with new seeds (the same for every system) and medians are reported;
* long tail: 64 rows whose budgets follow a Pareto distribution (most rollouts are short, a few are
  very long), so the active batch decays as in an RL rollout; total time per system, median over the
  repeats (interleaved as above).

The adaptive controller is one object for the whole run (as in a long-lived server): it learns costs and
acceptance across workloads. Its decision trace on the long-tail run is written out and plotted.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.tasks import load_questions, question_source
from ..engine.cost_model import CostModel
from ..engine.drafters import make_drafters
from ..engine.llm import LLM
from ..engine.params import SamplingParams
from ..engine.speculation import ControllerConfig
from ..engine.stats import summarize_trace
from ..utils.configs import from_dict
from .common import run_header, timed_fresh_generate
from .headroom import rate_needed, speculation_headroom

HEADROOM_K = 4  # drafts per step of the perfect drafter in the long tail's headroom bound
HEADROOM_TARGET = 1.1  # a long-tail gain over AR worth having: the bench prints the acceptance it takes


@dataclass
class AdaptiveRow:
    workload: str  # "fixed" or "long-tail"
    batch_size: int
    system: str  # "ar", "static" or "adaptive"
    config: str  # "off", "eagle:4", ... ("adaptive" for the controller)
    seconds: float
    generated_tokens: int
    tokens_per_s: float
    accept_len: float | None = None
    vs_best_other: float | None = None  # adaptive: tokens/s over the best of AR and every static config
    # adaptive: the same ratio within each repeat (systems interleaved, so slow drifts of a shared
    # machine cancel), median over the repeats
    vs_best_paired: float | None = None
    runs_tokens_per_s: list[float] = field(default_factory=list)
    arms: dict[str, int] = field(default_factory=dict)  # adaptive: decode steps per arm


def long_tail_budgets(rows: int, shortest: int, longest: int, alpha: float, seed: int) -> list[int]:
    """Pareto(alpha) lengths from ``shortest``, capped at ``longest``: a heavy tail as in RL rollouts."""
    u = np.random.default_rng(seed).random(rows)
    return np.minimum(longest, np.floor(shortest * (1 - u) ** (-1 / alpha))).astype(int).tolist()


def _measure(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    stats = llm.stats
    before = (stats.spec.verify_steps, stats.spec.emitted, stats.decode_steps, stats.decode_s, len(stats.trace),
              dict(stats.arm_steps), stats.prefill_s)
    outputs, seconds = timed_fresh_generate(llm, prompts, params)
    steps = stats.spec.verify_steps - before[0]
    trace = stats.trace[before[4]:]
    off_steps = [r.measured_s for r in trace if r.arm == "off"]
    return {"seconds": seconds, "tokens": sum(len(s.token_ids) for o in outputs for s in o.samples),
            "prefill_s": stats.prefill_s - before[6], "decode_s": stats.decode_s - before[3],
            "accept_len": (stats.spec.emitted - before[1]) / steps if steps else None,
            "step_s": (stats.decode_s - before[3]) / max(stats.decode_steps - before[2], 1),
            "off_step_s": statistics.mean(off_steps) if off_steps else None, "trace": trace,
            "arms": {a: n - before[5].get(a, 0) for a, n in stats.arm_steps.items() if n - before[5].get(a, 0)}}


def build_systems(base: LLM, drafter_specs: list[str], ks: tuple[int, ...], max_rows: int, seed: int,
                  controller_overrides: dict | None = None) -> dict[str, LLM]:
    """AR (``"off"``, the base engine), every static ``drafter:k`` and ``"adaptive"`` over all the drafters,
    one drafter instance each, shared by its engines (they run one at a time). ``controller_overrides``:
    ControllerConfig fields, a nested ``tuning`` mapping for its constants."""
    drafters = make_drafters(drafter_specs, base.model, base.tokenizer)
    systems = {"off": base}
    for name, drafter in drafters.items():
        for k in ks:
            systems[f"{name}:{k}"] = LLM(base.model, tokenizer=base.tokenizer, drafter=drafter, speculative=k,
                                         max_num_seqs=max_rows)
    config = from_dict({"max_draft_tokens": max(ks), "k_choices": list(ks), "seed": seed, **(controller_overrides or {})},
                       ControllerConfig)
    systems["adaptive"] = LLM(base.model, tokenizer=base.tokenizer, drafter=list(drafters.values()),
                              speculative=config, max_num_seqs=max_rows)
    return systems


def _rows(workload: str, batch: int, results: dict[str, list[dict]]) -> list[AdaptiveRow]:
    rows = []
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        tokens = int(statistics.median(r["tokens"] for r in runs))
        taus = [r["accept_len"] for r in runs if r["accept_len"] is not None]
        system = "ar" if name == "off" else "adaptive" if name == "adaptive" else "static"
        per_run = [r["tokens"] / r["seconds"] for r in runs]
        rows.append(AdaptiveRow(workload, batch, system, name, seconds, tokens, statistics.median(per_run),
                                statistics.median(taus) if taus else None, runs_tokens_per_s=per_run,
                                arms=runs[-1]["arms"] if name == "adaptive" else {}))
    others = [r for r in rows if r.system != "adaptive"]
    for row in rows:
        if row.system == "adaptive":
            row.vs_best_other = row.tokens_per_s / max(r.tokens_per_s for r in others)
            row.vs_best_paired = statistics.median(
                mine / max(r.runs_tokens_per_s[i] for r in others) for i, mine in enumerate(row.runs_tokens_per_s))
    return rows


def run_adaptive_bench(model: str, drafters: list[str], batch_sizes: tuple[int, ...], ks: tuple[int, ...],
                       temperature: float, new_tokens: int, repeats: int, device: str | None = None,
                       dtype: str | None = None, prompts_file: Path | None = None, seed: int = 0,
                       long_tail_rows: int = 64, long_tail_max: int = 256, trace_dir: Path | None = None) -> dict:
    """``long_tail_rows=0`` skips the long-tail workload."""
    rows_needed = max(*batch_sizes, long_tail_rows)
    base = LLM(model, device=device, dtype=dtype, max_num_seqs=rows_needed)
    systems = build_systems(base, drafters, ks, rows_needed, seed)
    prompts = [base.encode(q, chat=True) for q in load_questions(rows_needed, prompts_file)]
    print(HEADER, flush=True)
    rows, paired, trace = _fixed_workload(systems, prompts, batch_sizes, temperature, new_tokens, repeats, seed)
    budgets = long_tail_budgets(long_tail_rows, 16, long_tail_max, 1.2, seed) if long_tail_rows else []
    headroom = None
    if budgets:
        tail_rows, tail = _long_tail_workload(systems, prompts, budgets, temperature, repeats, seed)
        rows += tail_rows
        trace = tail["adaptive"][-1]["trace"]
        headroom = long_tail_headroom(systems, budgets, tail)
    summary = summarize_trace(trace, warmup=10)
    result = {"model": model, "device": str(base.model.device), "dtype": str(base.model.dtype),
              "threads": torch.get_num_threads(), "prompts": question_source(prompts_file),
              "temperature": temperature, "ks": list(ks),
              "drafters": drafters, "new_tokens": new_tokens, "long_tail_budgets": budgets,
              "prediction_median_relative_error": summary.median_relative_error,
              "off_vs_ar_step": paired, "rows": [asdict(r) for r in rows],
              "long_tail_trace": [asdict(r) for r in trace] if budgets else [], "long_tail_headroom": headroom}
    if trace_dir is not None and budgets:
        plot_trace(result["long_tail_trace"], Path(trace_dir) / "adaptive_trace.png")
    return result


def repeat_params(budgets: list[int], temperature: float, seed: int, repeat: int) -> list[SamplingParams]:
    """One row per budget. Every system gets the same seeds within a repeat; each repeat gets new ones,
    so the median over repeats also averages the luck of the sampled answers (with one seed per row
    for all repeats, a system's answers, and so its acceptance, would be the same draw every time)."""
    base = seed + 100_003 * (repeat + 1)
    return [SamplingParams(temperature=temperature, max_new_tokens=budget, ignore_eos=True, seed=base + i)
            for i, budget in enumerate(budgets)]


def _in_turn(systems: dict[str, LLM], seed: int, repeat: int) -> list[tuple[str, LLM]]:
    """The systems in a fresh seeded order each repeat: on a shared machine the load drifts within a
    repeat too, and a fixed order would hand the same system the same slot every time."""
    order = np.random.default_rng([seed, repeat]).permutation(len(systems))
    items = list(systems.items())
    return [items[i] for i in order]


def _fixed_workload(systems: dict[str, LLM], prompts: list[list[int]], batch_sizes: tuple[int, ...],
                    temperature: float, new_tokens: int, repeats: int, seed: int):
    """Every system at each fixed batch size; returns the rows, the paired SD-off vs AR step times and
    the adaptive controller's trace of the last run."""
    rows: list[AdaptiveRow] = []
    paired, trace = [], []
    for batch in batch_sizes:
        for llm in systems.values():  # warm-up (and the controller's first look at this batch)
            _measure(llm, prompts[:batch], repeat_params([new_tokens] * batch, temperature, seed, repeat=-1))
        results: dict[str, list[dict]] = {name: [] for name in systems}
        for repeat in range(repeats):
            params = repeat_params([new_tokens] * batch, temperature, seed, repeat)
            for name, llm in _in_turn(systems, seed, repeat):
                results[name].append(_measure(llm, prompts[:batch], params))
        off = [r["off_step_s"] for r in results["adaptive"] if r["off_step_s"] is not None]
        if off:
            paired.append({"batch_size": batch, "ar_step_ms": 1e3 * statistics.median(r["step_s"] for r in results["off"]),
                           "adaptive_off_step_ms": 1e3 * statistics.median(off)})
        for row in _rows("fixed", batch, results):
            rows.append(row)
            print(format_row(asdict(row)), flush=True)
        trace = results["adaptive"][-1]["trace"]
    return rows, paired, trace


def _long_tail_workload(systems: dict[str, LLM], prompts: list[list[int]], budgets: list[int],
                        temperature: float, repeats: int, seed: int):
    """All rows at once with heavy-tailed budgets, so the active batch decays; returns the rows and the
    adaptive controller's trace of its last run."""
    tail: dict[str, list[dict]] = {name: [] for name in systems}
    for repeat in range(repeats):  # interleaved like the fixed batches; medians are reported
        params = repeat_params(budgets, temperature, seed, repeat)
        for name, llm in _in_turn(systems, seed, repeat):
            tail[name].append(_measure(llm, prompts[:len(budgets)], params))
    rows = _rows("long-tail", len(budgets), tail)
    for row in rows:
        print(format_row(asdict(row)), flush=True)
    return rows, tail


def long_tail_headroom(systems: dict[str, LLM], budgets: list[int], tail: dict[str, list[dict]]) -> dict:
    """The most any drafter could gain on the long tail (see ``bench.headroom``): AR's measured
    prefill, the target's profiled step times, drafting free; a perfect drafter up to ``HEADROOM_K``
    and each drafter at the acceptance the controller measured (up to the benchmark's largest k)."""
    engine = systems["adaptive"].engine
    controller = engine.controller
    profile = CostModel.profile(engine.model, len(budgets), max(HEADROOM_K, controller.max_k) + 1,
                                cache_dir=controller.config.profile_cache)
    ar_runs = tail["off"]
    prefill = statistics.median(r["prefill_s"] for r in ar_runs)
    bounds = {f"perfect, k <= {HEADROOM_K}": speculation_headroom(budgets, profile.target_time, HEADROOM_K,
                                                                  prefill_s=prefill)}
    for name, estimate in controller.acceptance.items():
        rates = estimate.rates()
        bounds[f"{name} at rates {np.round(rates, 2).tolist()}"] = speculation_headroom(
            budgets, profile.target_time, controller.max_k, rates, prefill)
    first = next(iter(bounds.values()))
    needed = rate_needed(budgets, profile.target_time, HEADROOM_K, HEADROOM_TARGET, prefill)
    return {"ar_prefill_s": prefill, "ar_decode_measured_s": statistics.median(r["decode_s"] for r in ar_runs),
            "ar_decode_modelled_s": first.ar_decode_s, "target_speedup": HEADROOM_TARGET,
            "rate_needed_for_target": needed,
            "bounds": {label: {"decode_s": b.bound_decode_s, "decode_speedup": b.decode_speedup,
                               "total_speedup": b.total_speedup, "steps": b.bound_steps}
                       for label, b in bounds.items()}}


def plot_trace(trace: list[dict], path: Path) -> Path:
    """Chosen k (0 = off) and active batch over the steps of a rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(trace))
    ks = [0 if r["arm"] == "off" else int(r["arm"].rsplit(":", 1)[1]) for r in trace]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(steps, [r["batch"] for r in trace], color="tab:blue")
    top.set_ylabel("active batch")
    bottom.step(steps, ks, where="post", color="tab:orange")
    bottom.set_ylabel("chosen k (0 = off)")
    bottom.set_xlabel("decode step")
    fig.suptitle("adaptive controller over a long-tail rollout")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


HEADER = f"{'workload':<10}{'batch':>6}  {'system':<9}{'config':<22}{'tokens':>8}{'seconds':>9}{'tok/s':>9}" \
         f"{'tau':>6}  vs best (paired)"


def format_row(r: dict) -> str:
    tau = f"{r['accept_len']:.2f}" if r["accept_len"] is not None else "-"
    best = f"{r['vs_best_other']:.2f}x" if r["vs_best_other"] is not None else ""
    if r.get("vs_best_paired") is not None:
        best += f" ({r['vs_best_paired']:.2f}x paired)"
    return (f"{r['workload']:<10}{r['batch_size']:>6}  {r['system']:<9}{r['config'][-21:]:<22}"
            f"{r['generated_tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>9.1f}{tau:>6}  {best}")


def format_adaptive_table(result: dict) -> str:
    lines = [run_header(result, f"T={result['temperature']} k in {result['ks']}"), HEADER]
    lines += [format_row(r) for r in result["rows"]]
    lines.append(f"controller: median |predicted - measured| / measured after warm-up = "
                 f"{result['prediction_median_relative_error']:.1%}")
    for pair in result["off_vs_ar_step"]:
        lines.append(f"batch {pair['batch_size']}: AR step {pair['ar_step_ms']:.2f} ms, "
                     f"adaptive step with SD off {pair['adaptive_off_step_ms']:.2f} ms")
    room = result.get("long_tail_headroom")
    if room:
        lines.append(f"long-tail headroom (target profile, drafting free; AR prefill {room['ar_prefill_s']:.2f} s, "
                     f"AR decode measured {room['ar_decode_measured_s']:.2f} s, modelled {room['ar_decode_modelled_s']:.2f} s):")
        for label, bound in room["bounds"].items():
            lines.append(f"  {label}: at most {bound['total_speedup']:.2f}x AR in total "
                         f"({bound['decode_speedup']:.2f}x on the decode)")
        needed = room["rate_needed_for_target"]
        lines.append(f"  {room['target_speedup']:.2f}x AR needs acceptance >= {needed:.2f} at every draft position "
                     f"(k <= {HEADROOM_K}, drafting free)" if needed is not None else
                     f"  {room['target_speedup']:.2f}x AR is out of reach even for a perfect drafter")
    return "\n".join(lines)
