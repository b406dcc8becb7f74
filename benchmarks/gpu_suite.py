"""One command that turns an hour on a GPU into figures: correctness, AR and SD throughput, the adaptive
controller, and a short GRPO run, written as JSON and markdown.

    PYTHONPATH=src python benchmarks/gpu_suite.py --out runs/gpu-suite            # <= 8 min on one H100
    PYTHONPATH=src python benchmarks/gpu_suite.py --device cpu --quick --out DIR  # the < 60 s check (make test)

No network and nothing beyond PyTorch and transformers (and ReSpec from the checkout). Sections, each
within its own time budget (a size that would not fit is skipped and recorded):

1. parity: greedy tokens of ReSpec vs transformers ``generate`` on the same weights and dtype;
2. audit: ``respec audit`` at T = 0.7 with the n-gram and self-draft drafters;
3. throughput: AR tokens/s vs transformers per batch, with the AR step's time split;
4. spec: SD vs AR per drafter and k per batch;
5. adaptive: the controller vs AR and every static arm, fixed batches and the long tail, and the cost
   profile t(batch, tokens) it decides on;
6. grpo: a few GRPO steps with AR rollouts and with adaptive SD + the async online learner.

A section that cannot run here records ``"status": "skipped"`` and the reason; one that fails records
``"status": "error"`` and the error, and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_suite_* modules beside this file

SECTIONS = ("parity", "audit", "throughput", "spec", "adaptive", "grpo")


@dataclass(frozen=True)
class Sizes:
    """What each section runs; ``FULL`` fits one H100 in 8 minutes, ``QUICK`` a busy 2-core CPU in 30 s."""

    model: str = "auto"
    # Seconds per section on one H100 (guesses until a run there says otherwise: --budget-scale).
    budgets_s: dict = field(default_factory=lambda: {"parity": 20, "audit": 50, "throughput": 90, "spec": 100,
                                                     "adaptive": 100, "grpo": 70})
    total_s: float = 420.0  # for all sections together: with start-up, 8 minutes
    parity_prompts: int = 8
    parity_tokens: int = 64
    audit_k: int = 4
    audit_temperature: float = 0.7
    audit_samples: int = 2048
    audit_tokens: int = 48
    audit_rows: int = 256
    audit_rows_ngram: int = 32
    audit_control: bool = True  # the always-accept negative control
    batches: tuple[int, ...] = (1, 8, 64, 256)
    new_tokens: int = 128
    repeats: int = 3
    split_tokens: int = 32
    ks: tuple[int, ...] = (1, 2, 4)
    spec_temperature: float = 0.7
    spec_repeats: int = 2
    adaptive_ks: tuple[int, ...] = (2, 4)
    adaptive_tokens: int = 64
    adaptive_repeats: int = 2
    long_tail_rows: int = 128
    long_tail_max: int = 192
    long_tail_reserve_s: float = 45.0
    grpo_prompts: int = 16
    grpo_group: int = 8
    grpo_tokens: int = 128
    grpo_steps: int = 3
    grpo_learner_min_tokens: int = 256
    grpo_learner_updates: int = 8


FULL = Sizes()
QUICK = replace(FULL, model="tiny", budgets_s={name: 40 for name in SECTIONS}, total_s=150.0, parity_prompts=3,
                parity_tokens=16, audit_k=2, audit_samples=1024, audit_tokens=12, audit_rows=256, audit_rows_ngram=16,
                audit_control=False,
                batches=(1, 4), new_tokens=16, repeats=1, split_tokens=8, ks=(2,), spec_repeats=1, adaptive_ks=(1, 2),
                adaptive_tokens=12, adaptive_repeats=1, long_tail_rows=8, long_tail_max=32, long_tail_reserve_s=5.0,
                grpo_prompts=2, grpo_group=4, grpo_tokens=8, grpo_steps=2, grpo_learner_min_tokens=1,
                grpo_learner_updates=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the CPU check that runs in make test")
    parser.add_argument("--model", default=None,
                        help="auto (SmolLM2-135M when its weights are here, else its shape with random weights), "
                             "smollm2-135m, smollm2-135m-shape or tiny (default: auto; tiny with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time budget")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 with --quick, where a busy machine's other jobs make "
                             "every multi-threaded op wait on a descheduled thread; else torch's default)")
    return parser.parse_args(argv)


def run_section(name: str, fn, ctx, sizes: Sizes, deadline: float) -> dict:
    """One section within its budget; a SkipSection or an error is recorded, never raised."""
    from gpu_suite_setup import Budget, SkipSection, free_memory

    left = deadline - time.perf_counter()
    seconds = min(sizes.budgets_s[name], left)
    start = time.perf_counter()
    print(f"\n== {name}: budget {seconds:.0f} s", flush=True)
    if seconds <= 0:
        return {"status": "skipped", "reason": f"the suite's {sizes.total_s:.0f} s were spent before it began"}
    try:
        result = {"status": "ok", **fn(ctx, sizes, Budget(seconds))}
    except SkipSection as err:
        result = {"status": "skipped", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 -- one section's failure must not cost the others' figures
        result = {"status": "error", "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result.update(budget_s=seconds, seconds=time.perf_counter() - start)
    free_memory(ctx.device)
    print(section_markdown(name, result), flush=True)
    return result


def section_markdown(name: str, result: dict) -> str:
    head = f"## {name} ({result['status']}, {result['seconds']:.1f} s of {result['budget_s']:.0f} s)"
    if result["status"] != "ok":
        return f"{head}\n\n{result['status']}: {result['reason']}\n"
    skipped = "".join(f"\n- skipped {s}" for s in result.get("skipped_sizes", []))
    return f"{head}\n\n{result['markdown']}\n{skipped}\n"


def header_markdown(record: dict) -> str:
    machine, model = record["machine"], record["model"]
    lines = ["# ReSpec GPU suite", "", f"- device: {machine['device_name']} ({machine['device']}), dtype {record['dtype']}",
             f"- torch {machine['torch']}, transformers {machine['transformers']}, commit {machine['git_commit']}",
             f"- model: {model['name']}: {model['source']}", f"- command: `{machine['command']}`",
             f"- mode: {'quick' if record['quick'] else 'full'}; setup {record['setup_s']:.1f} s; budgets: "
             + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in record["sizes"]["budgets_s"].items())
             + f" ({record['sizes']['total_s']:.0f} s in all)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, budgets_s={k: v * args.budget_scale for k, v in sizes.budgets_s.items()},
                    total_s=sizes.total_s * args.budget_scale, model=args.model or sizes.model)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"sections: unknown {unknown}; choose from {SECTIONS}")
    start = time.perf_counter()
    import torch

    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    from gpu_suite_context import build_context
    from gpu_suite_setup import machine_record

    ctx = build_context(sizes, Path(args.out), args.device, args.dtype)
    record = {"quick": args.quick, "sizes": asdict(sizes), "machine": machine_record(ctx.device, [sys.executable, *sys.argv]),
              "dtype": ctx.dtype_name, "model": ctx.model_record(), "setup_s": time.perf_counter() - start,
              "sections": {}}
    print(header_markdown(record), flush=True)
    deadline = time.perf_counter() + sizes.total_s
    functions = section_functions()
    for name in SECTIONS:
        if name in chosen:
            record["sections"][name] = run_section(name, functions[name], ctx, sizes, deadline)
        else:
            record["sections"][name] = {"status": "skipped", "reason": "not in --sections", "seconds": 0.0, "budget_s": 0}
    record["total_s"] = time.perf_counter() - start
    write_outputs(record, Path(args.out))
    return 0


def section_functions() -> dict:
    from gpu_suite_decode import audit, parity, throughput
    from gpu_suite_grpo import grpo
    from gpu_suite_spec import adaptive, spec

    return {"parity": parity, "audit": audit, "throughput": throughput, "spec": spec, "adaptive": adaptive,
            "grpo": grpo}


def write_outputs(record: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = header_markdown(record) + f"- total {record['total_s']:.1f} s\n\n" + "\n".join(
        section_markdown(name, result) for name, result in record["sections"].items())
    (out / "gpu_suite.md").write_text(text)
    (out / "gpu_suite.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} ({record['total_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
