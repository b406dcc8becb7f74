"""``respec bench --spec``: autoregressive vs speculative decoding, side by side, per drafter.

For each batch size and temperature the same prompts run through the plain engine (AR) and through
the engine with each drafter, arms alternating within each repeat, medians reported. Rows stop at
EOS as real rollouts do, so throughput is generated tokens / seconds; the SD arms also report the
acceptance length (tokens emitted per row per verify step) measured in those same runs.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.tasks import load_questions, question_source
from ..engine.llm import LLM
from ..engine.params import SamplingParams
from .common import run_header, timed_fresh_generate


@dataclass
class SpecRow:
    system: str  # "ar" or "sd"
    drafter: str | None
    k: int
    temperature: float
    batch_size: int
    new_tokens: int  # the max_new_tokens budget per row
    seconds: float
    generated_tokens: int
    tokens_per_s: float
    accept_len: float | None = None
    accept_rate: float | None = None
    speedup_vs_ar: float | None = None


def _arm(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    def run() -> tuple[float, int, float, float]:
        before = llm.stats.spec.verify_steps, llm.stats.spec.emitted, llm.stats.spec.drafted, llm.stats.spec.accepted
        outputs, seconds = timed_fresh_generate(llm, prompts, params)
        tokens = sum(len(s.token_ids) for o in outputs for s in o.samples)
        spec = llm.stats.spec
        steps, emitted = spec.verify_steps - before[0], spec.emitted - before[1]
        drafted, accepted = spec.drafted - before[2], spec.accepted - before[3]
        return seconds, tokens, emitted / steps if steps else 0.0, accepted / drafted if drafted else 0.0

    return run


def run_spec_bench(model: str, drafters: list[str], batch_sizes: tuple[int, ...], k: int,
                   temperatures: tuple[float, ...], new_tokens: int, repeats: int, device: str | None = None,
                   dtype: str | None = None, prompts_file: Path | None = None, seed: int = 0) -> dict:
    ar = LLM(model, device=device, dtype=dtype, max_num_seqs=max(batch_sizes))
    speculative = {name: LLM(ar.model, tokenizer=ar.tokenizer, drafter=name, speculative=k,
                             max_num_seqs=max(batch_sizes)) for name in drafters}
    prompts = [ar.encode(q, chat=True) for q in load_questions(max(batch_sizes), prompts_file)]
    rows: list[SpecRow] = []
    print(HEADER, flush=True)
    for temperature in temperatures:
        for batch in batch_sizes:
            params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, seed=seed)
            arms = {"ar": _arm(ar, prompts[:batch], params)}
            arms.update({name: _arm(llm, prompts[:batch], params) for name, llm in speculative.items()})
            for run in arms.values():
                run()  # warm-up
            results: dict[str, list[tuple]] = {name: [] for name in arms}
            for _ in range(repeats):
                for name, run in arms.items():
                    results[name].append(run())
            ar_rate = None
            for name, runs in results.items():
                seconds = statistics.median(r[0] for r in runs)
                tokens = int(statistics.median(r[1] for r in runs))
                rate = statistics.median(r[1] / r[0] for r in runs)
                row = SpecRow("ar" if name == "ar" else "sd", None if name == "ar" else name, 0 if name == "ar" else k,
                              temperature, batch, new_tokens, seconds, tokens, rate)
                if name == "ar":
                    ar_rate = rate
                else:
                    row.accept_len = statistics.median(r[2] for r in runs)
                    row.accept_rate = statistics.median(r[3] for r in runs)
                    row.speedup_vs_ar = rate / ar_rate
                rows.append(row)
                print(format_row(asdict(row)), flush=True)
    result = {"model": model, "device": str(ar.model.device), "dtype": str(ar.model.dtype),
              "threads": torch.get_num_threads(), "prompts": question_source(prompts_file), "k": k,
              "rows": [asdict(r) for r in rows]}
    result["pays_up_to"] = pay_limits(result["rows"])
    print(format_pay_limits(result["pays_up_to"]), flush=True)
    return result


def pay_limits(rows: list[dict]) -> list[dict]:
    """Per (drafter, temperature): the batch sizes where SD beat AR, and the largest batch up to which
    it beat AR at every measured size (None: it lost already at the smallest)."""
    limits = []
    keys = dict.fromkeys((r["drafter"], r["temperature"]) for r in rows if r["system"] == "sd")
    for drafter, temperature in keys:
        runs = sorted((r for r in rows if r["drafter"] == drafter and r["temperature"] == temperature),
                      key=lambda r: r["batch_size"])
        wins = [r["batch_size"] for r in runs if r["speedup_vs_ar"] > 1.0]
        up_to = None
        for r in runs:
            if r["speedup_vs_ar"] <= 1.0:
                break
            up_to = r["batch_size"]
        limits.append({"drafter": drafter, "temperature": temperature, "wins_at": wins, "pays_up_to": up_to})
    return limits


def format_pay_limits(limits: list[dict]) -> str:
    lines = []
    for limit in limits:
        where = f"pays up to batch {limit['pays_up_to']}" if limit["pays_up_to"] is not None \
            else "does not pay at the smallest batch"
        wins = ", ".join(map(str, limit["wins_at"])) or "none"
        lines.append(f"{limit['drafter']} at T = {limit['temperature']}: SD {where} (faster than AR at batch: {wins})")
    return "\n".join(lines)


HEADER = f"{'system':<6}{'drafter':<28}{'k':>3}{'T':>5}{'batch':>6}{'tokens':>8}{'seconds':>9}{'tok/s':>9}" \
         f"{'tau':>6}{'rate':>6}{'vs AR':>7}"


def format_row(r: dict) -> str:
    drafter = (r["drafter"] or "-")[-27:]
    tau = f"{r['accept_len']:.2f}" if r["accept_len"] is not None else "-"
    rate = f"{r['accept_rate']:.2f}" if r["accept_rate"] is not None else "-"
    speed = f"{r['speedup_vs_ar']:.2f}x" if r["speedup_vs_ar"] is not None else "-"
    return (f"{r['system']:<6}{drafter:<28}{r['k']:>3}{r['temperature']:>5.1f}{r['batch_size']:>6}"
            f"{r['generated_tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>9.1f}{tau:>6}{rate:>6}{speed:>7}")


def format_spec_table(result: dict) -> str:
    lines = [run_header(result, f"k={result['k']}"), HEADER]
    lines += [format_row(r) for r in result["rows"]]
    if result.get("pays_up_to"):
        lines.append(format_pay_limits(result["pays_up_to"]))
    return "\n".join(lines)
